"""`k2 model info|init`, `k2 export`, `k2 import-hf`: create, inspect and move models."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import rich_click as click

from k2cli.artifacts import open_artifact
from k2cli.commands.common import run_options
from k2cli.stages.runner import Stage
from k2cli.console import info, out, print_recipe, table
from k2cli.errors import K2Error
from k2cli.model.config import PRESETS, ModelConfig, human
from k2cli.recipes import build, merge, nest, parse_override


@dataclass
class ModelInitRecipe:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    seed: int = 0


def _config_from(ref: str | None, preset: str | None, overrides) -> tuple[ModelConfig, str]:
    if ref:
        from k2cli.model.io import read_config

        art = open_artifact(ref, kind="model")
        cfg = read_config(art.path)
        return cfg, art.id
    table_ = {"model": {"preset": preset or "tiny"}}
    for text in overrides:
        path, value = parse_override(text)
        if path[0] != "model":
            path = ["model"] + path
        table_ = merge(table_, nest(path, value))
    recipe = build(ModelInitRecipe, table_)
    return recipe.model.validate(), f"preset {preset or 'tiny'}"


# ----------------------------------------------------------------------------- k2 model


@click.group("model", cls=click.RichGroup)
def model_group():
    """Create and inspect models (MLA + fine-grained MoE)."""


@model_group.command("info")
@click.argument("ref", required=False)
@click.option("--preset", default=None, help=f"A named shape: {', '.join(PRESETS)}.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. --set num_hidden_layers=8.")
@click.option("--seq-len", type=int, default=None, help="Sequence length for the FLOPs estimate (default: the model's context).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info_cmd(ref, preset, overrides, seq_len, as_json):
    """Shapes, total and active parameters, FLOPs per token and KV-cache size of a model.

    Give a model artifact REF or a `--preset` (kimi-k2 is counted on the meta device, nothing allocated).
    """
    import torch

    from k2cli.model.transformer import K2Model

    cfg, source = _config_from(ref, preset, overrides)
    with torch.device("meta"):
        built = K2Model(cfg).num_params()
    counts = cfg.param_counts()
    assert built == counts["total"], (built, counts["total"])  # the formula is the model
    flops = cfg.flops_per_token(seq_len)
    report = {
        "source": source,
        "config": cfg.to_dict(),
        "params": counts,
        "flops_per_token": flops,
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "kv_cache_bytes_per_token_bf16_without_mla": cfg.num_hidden_layers
        * cfg.num_attention_heads
        * (cfg.qk_head_dim + cfg.v_head_dim)
        * 2,
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    shape = [
        ["layers", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, {cfg.num_moe_layers} MoE)"],
        ["hidden / vocab", f"{cfg.hidden_size} / {cfg.vocab_size}"],
        ["attention (MLA)", f"{cfg.num_attention_heads} heads, q_lora {cfg.q_lora_rank or 'off'}, kv_lora {cfg.kv_lora_rank}, "
         f"qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} rope, v {cfg.v_head_dim}"],
        ["experts", f"{cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}), {cfg.n_shared_experts} shared, "
         f"width {cfg.moe_intermediate_size}, groups {cfg.n_group}/{cfg.topk_group}"],
        ["context", f"{cfg.max_position_embeddings}" + (f" ({cfg.rope_scaling.type} x{cfg.rope_scaling.factor:g} "
         f"from {cfg.rope_scaling.original_max_position_embeddings})" if cfg.rope_scaling else "")],
    ]
    out.print(table(f"model {cfg.name} ({source})", ["", ""], shape))
    parts = [[k, f"{v:,}", human(v)] for k, v in counts.items() if k not in ("total", "active", "per_expert")]
    parts.append(["[bold]total[/]", f"{counts['total']:,}", f"[bold]{human(counts['total'])}[/]"])
    parts.append(["[bold]active per token[/]", f"{counts['active']:,}", f"[bold]{human(counts['active'])}[/]"])
    out.print(table("parameters", ["part", "count", ""], parts, right=(1, 2)))
    sparsity = cfg.n_routed_experts / cfg.num_experts_per_tok if cfg.num_moe_layers else 1
    out.print(table("cost per token", ["", ""], [
        ["forward FLOPs", f"{human(flops['forward'])} at T={flops['seq_len']}"],
        ["training FLOPs", f"{human(flops['train'])} (3x forward)"],
        ["sparsity", f"{sparsity:g}"],
        ["KV cache (bf16)", f"{report['kv_cache_bytes_per_token_bf16']:,} B/token (without MLA: "
         f"{report['kv_cache_bytes_per_token_bf16_without_mla']:,})"],
    ]))


@model_group.command("init")
@click.option("--preset", default="tiny", show_default=True, help=f"A named shape: {', '.join(PRESETS)}.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. --set hidden_size=256.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@run_options()
def init_cmd(preset, overrides, seed, opts):
    """Write a randomly initialised model artifact."""
    from k2cli.model.io import save_model_files
    from k2cli.model.transformer import build_model

    cfg, source = _config_from(None, preset, overrides)
    need = cfg.param_counts()["total"] * 4
    avail = _available_memory()
    if avail and need > 0.8 * avail:
        raise K2Error(
            f"preset '{cfg.name}' has {human(cfg.param_counts()['total'])} parameters ({need / 2**30:.0f} GiB in fp32), "
            f"more than this machine's memory ({avail / 2**30:.0f} GiB)",
            "use 'k2 model info' to count it, or a smaller preset",
        )
    recipe = {"model": cfg.to_dict(), "seed": seed}
    print_recipe("model init", recipe, source)
    with Stage("model", "model", recipe, opts) as st:
        if st.up_to_date([]):
            return
        model = build_model(cfg, seed=seed)
        with st.writer() as w:
            save_model_files(model, w.dir)
            w.metrics = {"params_total": cfg.param_counts()["total"], "params_active": cfg.param_counts()["active"]}
            art = w.commit(summary=f"randomly initialised {cfg.name} model (seed {seed})")
    info(f"[green]wrote[/] {art.path} ({art.id}): {human(w.metrics['params_total'])} parameters, "
         f"{human(w.metrics['params_active'])} active")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- export / import


@click.command("export")
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True, help="Output format.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Storage type of the weights (bf16 halves the size; the router's bias stays fp32).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
def export_cmd(ref, fmt, dtype, out, force):
    """Export a model artifact to Hugging Face DeepseekV3 format (transformers, vLLM, lm-eval).

    Writes config.json, generation_config.json, model.safetensors and the model's tokenizer with
    its chat template; generation stops at end of text and at the template's end of turn.
    Load it with `transformers.AutoModelForCausalLM.from_pretrained(OUT)`.
    """
    from k2cli.model.hf import EXPORT_DTYPES, stop_token_ids, write_hf_dir
    from k2cli.model.io import copy_tokenizer_files, load_model, state_dict_for_saving

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise K2Error(f"export target {dest} exists and is not empty", "choose another --out or pass --force")
    model, art = load_model(ref, verify=True)
    tmp = dest.resolve().parent / f".tmp-export-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise K2Error(f"cannot write to {dest.parent}: {e.strerror}", "choose a writable --out")
    try:
        copied = copy_tokenizer_files(art.path, tmp)
        if "tiktoken.model" in copied and "tokenizer.json" not in copied:
            # Kimi's tiktoken tokenizer needs its remote code in transformers: write the same one as tokenizer.json
            from k2cli.data.tokenizer import load_tokenizer

            load_tokenizer(tmp).save_hf(tmp)
        eos, generation, note = stop_token_ids(tmp, model.config)
        write_hf_dir(state_dict_for_saving(model), model.config, tmp, EXPORT_DTYPES[dtype], eos, generation)
        _share(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = ", tokenizer" if copied else ", no tokenizer (the artifact has none)"
    stops = f"stops at token ids {eos}" if eos else "no stop token: the model has no eos_token_id"
    info(f"[green]exported[/] {art.id} -> {dest} (DeepseekV3ForCausalLM, {dtype}{tok}; {stops})")
    if note:
        info(f"[yellow]note[/] {note}")


def _share(directory: Path) -> None:
    """World-readable like any published checkpoint: directories 0755, files 0644."""
    os.chmod(directory, 0o755)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


@click.command("import-hf")
@click.argument("directory", type=click.Path())
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Storage type of the imported matrices. auto: bf16 when config.json says bfloat16 (DeepSeek-V3, "
                   "Kimi K2: FP8 weights are dequantised to it), else fp32. Norms and router biases stay fp32.")
@run_options()
def import_hf_cmd(directory, dtype, opts):
    """Import a Hugging Face DeepseekV3 / Kimi K2 checkpoint directory as a model artifact.

    Reads sharded safetensors one shard at a time, dequantises FP8 block-quantised weights
    (weight_scale_inv), skips layers beyond num_hidden_layers (multi-token prediction) and
    carries the tokenizer files, chat template and generation_config.json over verbatim
    (a tokenization_*.py is never copied or run).
    """
    from k2cli.model.hf import LAYER_KEY, from_hf_state_dict, ignored_key
    from k2cli.model.hf_checkpoint import SCALE_SUFFIX, iter_hf_tensors, open_hf_checkpoint
    from k2cli.model.io import copy_tokenizer_files, save_state_dict_files

    src = Path(directory)
    ckpt = open_hf_checkpoint(src)
    cfg = ckpt.config
    target = _import_dtype(dtype, ckpt.hf)
    tensors = iter_hf_tensors(ckpt, keep=lambda name: not ignored_key(name, cfg))
    sd, _ = from_hf_state_dict(tensors, cfg, target, source=str(src))
    skipped = [k for k in ckpt.weight_map if ignored_key(k, cfg) and not k.endswith(SCALE_SUFFIX)]
    skipped_layers = sorted({int(m.group(1)) for k in skipped if (m := LAYER_KEY.match(k))})
    recipe = {"model": cfg.to_dict(), "source": str(src.resolve()), "dtype": str(target).removeprefix("torch.")}
    with Stage("import", "model", recipe, opts) as st:
        if st.up_to_date([]):
            return
        with st.writer() as w:
            save_state_dict_files(sd, cfg, w.dir)
            carried = copy_tokenizer_files(src, w.dir)
            w.metrics = {"params_total": cfg.param_counts()["total"], "ignored_keys": len(skipped),
                         "fp8_dequantised": ckpt.block is not None, "tokenizer_files": len(carried)}
            art = w.commit(summary=f"imported from {directory}")
    info(f"[green]imported[/] {directory} -> {art.path} ({art.id}), {w.metrics['params_total']:,} parameters in "
         f"{recipe['dtype']}" + (f", FP8 {ckpt.block[0]}x{ckpt.block[1]} blocks dequantised" if ckpt.block else ""))
    if skipped:
        info(f"[yellow]note[/] skipped {len(skipped)} tensors of layers {skipped_layers or ''} beyond num_hidden_layers="
             f"{cfg.num_hidden_layers} (multi-token prediction), and rotary caches")
    code = sorted(p.name for p in src.glob("*.py"))
    info(f"[green]carried[/] {', '.join(carried)}" if carried else "[yellow]note[/] the checkpoint has no tokenizer files")
    if code:
        info(f"[yellow]note[/] not copied: {', '.join(code)} (remote code is never run; k2 reads the data files)")


def _import_dtype(choice: str, hf: dict):
    import torch

    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]
    return torch.bfloat16 if (hf.get("torch_dtype") or hf.get("dtype")) == "bfloat16" else torch.float32


COMMANDS = [model_group, export_cmd, import_hf_cmd]
