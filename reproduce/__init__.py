"""`make reproduce`: the Kimi K2 report's claims re-measured at small scale (see run.py)."""
