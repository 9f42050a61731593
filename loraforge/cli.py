"""`loraforge` command line. Each command is a thin shell over a library function; user mistakes print a
clear message and exit with code 2 (never a traceback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Config-driven fine-tuning: LoRA, QLoRA, P-tuning v2, prompt tuning, freeze, full; SD LoRA.")

SetOpt = typer.Option(None, "--set", help="Override a config key: --set learning_rate=1e-4 (repeatable).")


def _overrides(pairs: Optional[List[str]]) -> dict:
    import yaml

    from loraforge.errors import ConfigError, Problem

    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError([Problem("--set", "expects key=value", value=pair, fix="e.g. --set epochs=1")])
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError([Problem("--set", f"the value of `{key.strip()}` is not valid YAML: "
                                       f"{getattr(err, 'problem', None) or err}", value=pair,
                                       fix=f"quote it: --set '{key.strip()}=\"{value}\"', or close the bracket "
                                           "of a list: --set target_modules=[q_proj,v_proj]")]) from None
    return out


def _adapters(specs: Optional[List[str]]) -> dict[str, str]:
    """`name=path` (or a bare path, named after its folder) → {name: path}."""
    from loraforge.errors import ConfigError, Problem

    out: dict[str, str] = {}
    for spec in specs or []:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not name or not path:
            raise ConfigError([Problem("--adapter", "expects NAME=DIR", value=spec, fix="--adapter cardio=output/cardio")])
        if name == "base":
            raise ConfigError([Problem("--adapter", "`base` is reserved for the model without adapters", value=spec,
                                       fix=f"give the adapter another name, e.g. --adapter my-run={path}")])
        out[name] = path
    return out


@app.command()
def train(config: Path = typer.Argument(..., help="Run config YAML."), set_: Optional[List[str]] = SetOpt):
    """Validate the config, data and model, then fine-tune."""
    from loraforge.config import TaskType, load_config
    from loraforge.preflight import run_preflight

    cfg = load_config(config, _overrides(set_))
    _hide_unused_backends(cfg)
    # the data statistics are printed once, by training, from the examples it really trains on
    run_preflight(cfg, echo=typer.echo, show_data=cfg.task_type is TaskType.TEXT_TO_IMAGE)
    if cfg.task_type is TaskType.TEXT_TO_IMAGE:
        from loraforge.image.train import train_image_lora

        out = train_image_lora(cfg)
        typer.echo(f"\nLoRA weights: {out}\nTry it: loraforge generate-image --base {cfg.base_model} --lora {out} "
                   f"--prompt \"...\" --out image.png")
        return
    from loraforge.train.loop import train as run_training

    result = run_training(cfg, echo=typer.echo)
    if not result.is_main:  # the other ranks of a multi-process run: rank 0 says it once
        return
    typer.echo(f"\nAdapter saved in {result.run_dir}" if _is_adapter(cfg) else f"\nModel saved in {result.run_dir}")
    chat = f"loraforge chat --base {cfg.base_model} --adapter {result.run_dir}" if _is_adapter(cfg) \
        else f"loraforge chat --base {result.run_dir}"
    typer.echo(f"Chat with it:  {chat}")


def _hide_unused_backends(cfg) -> None:
    """This process trains one run: optional back ends it does not use are not imported (start-up time)."""
    from loraforge.errors import LoraforgeError
    from loraforge.models.gguf import resolve_model_path
    from loraforge.train.backends import hide, unused_backends

    try:
        model_dir = resolve_model_path(cfg.base_model)
    except LoraforgeError:  # preflight reports it
        model_dir = None
    hide(unused_backends(cfg, model_dir))


def _is_adapter(cfg) -> bool:
    from loraforge.methods import is_adapter_method

    return is_adapter_method(cfg.method)


@app.command()
def validate(config: Path = typer.Argument(..., help="Run config YAML."), set_: Optional[List[str]] = SetOpt):
    """Check config, data and model (no training, no weights loaded)."""
    from loraforge.config import load_config
    from loraforge.preflight import run_preflight

    cfg = load_config(config, _overrides(set_))
    run_preflight(cfg, echo=typer.echo)
    typer.echo("config OK")


@app.command()
def inspect(model: str = typer.Argument(..., help="Built-in name, HF model dir or .gguf file."),
            trust_remote_code: bool = typer.Option(False, help="Allow the model's own code.")):
    """Architecture, kind, task types, real linear module names and default LoRA targets."""
    from loraforge.models.inspect import format_inspect, inspect_model

    typer.echo(format_inspect(inspect_model(model, trust_remote_code=trust_remote_code)))


@app.command()
def estimate(config: Path = typer.Argument(..., help="Run config YAML."), set_: Optional[List[str]] = SetOpt,
             processes: int = typer.Option(1, "--processes", min=1, help="Processes sharing the run (per-process estimate)."),
             sharding: Optional[str] = typer.Option(None, "--sharding", help="ddp or fsdp2 (default: the config's `sharding`).")):
    """Trainable/total parameters and an estimate of peak training memory (per process)."""
    from loraforge.config import load_config
    from loraforge.estimate import estimate_memory, format_estimate

    if sharding not in (None, "ddp", "fsdp2"):
        raise typer.BadParameter(f"{sharding!r}: allowed ddp, fsdp2", param_hint="--sharding")
    typer.echo(format_estimate(estimate_memory(load_config(config, _overrides(set_)), processes=processes,
                                               sharding=sharding)))


@app.command("import-gguf")
def import_gguf_cmd(gguf_file: Path = typer.Argument(..., help="A .gguf model file."),
                    out_dir: Path = typer.Argument(..., help="Where to write the HF model dir.")):
    """Dequantize a GGUF model into a normal Hugging Face model dir."""
    from loraforge.models.gguf import import_gguf
    from loraforge.train.rundir import check_output_path

    check_output_path(out_dir, [gguf_file], key="out_dir")
    typer.echo(f"imported into {import_gguf(gguf_file, out_dir)}")


@app.command()
def convert(src: Path = typer.Argument(..., help="A ChatGLM2/3, Baichuan-7B/Baichuan2-7B or Qwen-1 checkpoint dir."),
            out: Path = typer.Argument(..., help="Where to write the native Hugging Face model dir.")):
    """Convert an old remote-code checkpoint to its native transformers architecture (GLM, LLaMA, Qwen2)."""
    from loraforge.models.native import convert as convert_checkpoint, import_record
    from loraforge.train.rundir import check_output_path

    check_output_path(out, [src], key="out")
    done = convert_checkpoint(src, out)
    rec = import_record(done) or {}
    typer.echo(f"converted {rec.get('variant')} → {rec.get('native_architecture')} in {done}")
    for note in rec.get("notes", []):
        typer.echo(f"note: {note}")


@app.command()
def chat(base: str = typer.Option("smollm2", help="Base model (built-in name, dir or .gguf)."),
         adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR of an adapter (repeatable)."),
         max_new_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0)):
    """Interactive chat; `/adapter NAME` switches adapters, `/adapter base` the plain base model."""
    from loraforge.inference import GenerationSettings, InferenceModel, chat_repl

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    settings.validate()  # before the model loads
    model = InferenceModel.load(base, _adapters(adapter))
    chat_repl(model, settings=settings)


@app.command()
def generate(prompt: str = typer.Option(..., help="The user message."),
             base: str = typer.Option("smollm2", help="Base model (built-in name, dir or .gguf)."),
             adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR of an adapter (repeatable)."),
             use: Optional[str] = typer.Option(None, help="Which adapter answers (default: the first given)."),
             max_new_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0)):
    """One-shot generation with an adapter applied."""
    from loraforge.errors import ConfigError, Problem, suggestion
    from loraforge.inference import GenerationSettings, InferenceModel
    from loraforge.inference.prompts import check_text

    adapters = _adapters(adapter)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    settings.validate()  # every argument is checked before the model loads
    check_text(prompt, "--prompt")
    name = use or (next(iter(adapters)) if adapters else "base")
    if name != "base" and name not in adapters:
        raise ConfigError([Problem("--use", "names no adapter given with --adapter", value=name,
                                   allowed=", ".join(["base", *adapters]),
                                   fix=suggestion(name, ["base", *adapters]) or "use one of the --adapter names")])
    model = InferenceModel.load(base, adapters)
    result = model.generate([{"role": "user", "content": prompt}], adapter=name, settings=settings)
    typer.echo(result.text)


@app.command()
def merge(run_dir: Path = typer.Argument(..., help="A LoRA run dir (or adapter dir)."),
          out: Path = typer.Option(..., "--out", help="Where to write the standalone model."),
          base: Optional[str] = typer.Option(None, help="Base model (default: the run's config.yaml)."),
          dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
          layout: str = typer.Option("native", help="native | original: a base converted from ChatGLM2/3, "
                                     "Baichuan2 or Qwen-1 can be written back in its original weight names"),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it holds an earlier merge.")):
    """Merge a LoRA adapter into its base and verify the merged logits."""
    import tempfile

    from loraforge.errors import LoraforgeError, Problem
    from loraforge.export import merge_adapter
    from loraforge.train.rundir import base_model_dirs, check_output_path

    check_output_path(out, [run_dir, *(base_model_dirs(base) if base else [])], key="--out", replaces=False)
    if out.exists() and not out.is_dir():
        raise LoraforgeError([Problem("--out", "exists and is a file, not a folder", value=str(out),
                                      fix="pick a folder path for the merged model (or remove the file)")])
    if layout not in ("native", "original"):
        raise LoraforgeError([Problem("layout", "unknown layout", value=layout, allowed="native, original")])
    if layout == "native":
        typer.echo(str(merge_adapter(run_dir, out, base=base, dtype=dtype, overwrite=overwrite)))
        return
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.native.original import converted_base_of_run, to_original_checkpoint

    converted = resolve_model_path(base) if base else converted_base_of_run(run_dir)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        typer.echo(str(merge_adapter(run_dir, Path(tmp) / "native", base=str(converted), dtype=dtype)))
        typer.echo(f"original layout: {to_original_checkpoint(Path(tmp) / 'native', converted, out)}")


@app.command("export-original", hidden=True, deprecated=True)
def export_original_cmd(run_dir: Path = typer.Argument(..., help="A LoRA run on a converted ChatGLM/Baichuan/Qwen-1."),
                        out: Path = typer.Option(..., "--out", help="Where to write the original-layout adapter.")):
    """Deprecated alias of `loraforge export RUN_DIR --to original --out DIR`."""
    from loraforge.exporters import export as run_export

    typer.echo("note: `export-original` is deprecated; use `loraforge export RUN_DIR --to original --out DIR`", err=True)
    typer.echo(run_export(run_dir, "original", out).format())


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A run dir (LoRA/QLoRA adapter, or a full/freeze model)."),
           to: str = typer.Option(..., "--to", help="hf | gguf | ollama | gguf-lora | vllm | original"),
           out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
           quant: str = typer.Option("f16", help="GGUF type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (k-quants: llama-quantize)."),
           base: Optional[str] = typer.Option(None, help="Base model (default: the run's config.yaml)."),
           base_gguf: Optional[str] = typer.Option(None, help="gguf-lora: the base's GGUF path/name to record."),
           name: Optional[str] = typer.Option(None, help="Model name in the files (default: the run folder's)."),
           overwrite: bool = typer.Option(False, help="Replace a non-empty --out.")):
    """Export a run to where it is deployed: merged HF dir, GGUF (llama.cpp), Ollama, GGUF LoRA, vLLM, or the
    original ChatGLM2/3 / Baichuan2 / Qwen-1 layout of a converted base."""
    from loraforge.exporters import export as run_export

    result = run_export(run_dir, to, out, quant=quant, base=base, base_gguf=base_gguf, name=name, overwrite=overwrite)
    typer.echo(result.format())


@app.command("eval")
def eval_cmd(data: Path = typer.Option(..., help="Test data (.jsonl/.json; instruction/output or messages)."),
             base: str = typer.Option("smollm2", help="Base model."),
             adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR of an adapter (repeatable)."),
             out: Path = typer.Option(Path("eval_report"), help="Report folder (JSON + Markdown)."),
             max_new_tokens: int = typer.Option(128), tokenize: str = typer.Option("auto", help="auto|char|word|jieba"),
             metrics: str = typer.Option("exact_match,contains,bleu,rouge_l", help="Comma-separated metric names."),
             temperature: float = typer.Option(0.0), batch_size: int = typer.Option(8),
             system_prompt: Optional[str] = typer.Option(None), cutoff_len: int = typer.Option(1024),
             limit: Optional[int] = typer.Option(None, help="Only the first N examples.")):
    """Loss, perplexity and generation metrics for the base and each adapter, side by side."""
    from loraforge.evaluate import EvalOptions, evaluate, format_summary, write_report
    from loraforge.train.rundir import base_model_dirs, check_output_path

    check_output_path(out, [data, *base_model_dirs(base), *_adapters(adapter).values()], replaces=False)

    options = EvalOptions(max_new_tokens=max_new_tokens, tokenize=tokenize, limit=limit, temperature=temperature,
                          batch_size=batch_size, system_prompt=system_prompt, cutoff_len=cutoff_len,
                          metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()))
    report = evaluate(base, _adapters(adapter), data, options, progress=typer.echo)
    json_path, md_path = write_report(report, out)
    typer.echo(format_summary(report))
    typer.echo(f"\nreport: {md_path} and {json_path}")


@app.command()
def serve(config: Optional[Path] = typer.Option(None, help="Server YAML (base, adapters, api_key, routes)."),
          base: Optional[str] = typer.Option(None, help="Base model (overrides the YAML)."),
          adapter: Optional[List[str]] = typer.Option(None, help="NAME=DIR (repeatable)."),
          host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
          port: Optional[int] = typer.Option(None), api_key: Optional[str] = typer.Option(None, envvar="LORAFORGE_API_KEY")):
    """OpenAI-compatible server: one base model, N adapters, the request's `model` picks one."""
    from loraforge.serve.config import load_server_config
    from loraforge.serve.app import run_server

    overrides = {k: v for k, v in dict(base=base, host=host, port=port, api_key=api_key).items() if v is not None}
    if adapter:
        overrides["adapters"] = _adapters(adapter)
    run_server(load_server_config(config, overrides))


@app.command()
def webui(workspace: Path = typer.Option(Path("."), help="Folder for configs, runs and reports; file pickers stay inside it."),
          host: str = typer.Option("127.0.0.1", help="Bind address; anything but loopback needs the printed token."),
          port: int = typer.Option(7860),
          token: Optional[str] = typer.Option(None, envvar="LORAFORGE_WEBUI_TOKEN", help="Access token (made for you off loopback)."),
          root: Optional[List[Path]] = typer.Option(None, help="Extra folder the pickers may read (repeatable).")):
    """Web UI: build a config, see what the model will learn, train, watch, compare, chat, evaluate, export."""
    from loraforge.webui.app import run_webui

    run_webui(workspace, host=host, port=port, token=token, extra_roots=root or [], echo=typer.echo)


@app.command("generate-image")
def generate_image_cmd(prompt: str = typer.Option(...), base: str = typer.Option(..., help="Local SD pipeline dir or single file."),
                       lora: Optional[List[str]] = typer.Option(None, help="PATH[:WEIGHT] of a LoRA (repeatable)."),
                       init_image: Optional[Path] = typer.Option(None, help="Image-to-image source."),
                       strength: float = typer.Option(0.75), steps: int = typer.Option(25), seed: int = typer.Option(0),
                       guidance_scale: float = typer.Option(7.5), negative_prompt: Optional[str] = typer.Option(None),
                       height: Optional[int] = typer.Option(None), width: Optional[int] = typer.Option(None),
                       base_config: Optional[Path] = typer.Option(None, help="Pipeline config dir for a single-file base."),
                       out: Path = typer.Option(Path("image.png"))):
    """Text-to-image or image-to-image with one or more LoRAs."""
    from loraforge.image.generate import generate_image, parse_lora_arg
    from loraforge.train.rundir import check_output_path

    check_output_path(out, [base, init_image, *(spec.split(":")[0] for spec in lora or [])], replaces=False)

    generate_image(base, prompt, loras=[parse_lora_arg(spec) for spec in lora or []], init_image=init_image,
                   strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                   height=height, width=width, negative_prompt=negative_prompt, base_config=base_config, out_path=out)
    typer.echo(f"wrote {out}")


@app.command("export-kohya")
def export_kohya_cmd(lora_dir: Path = typer.Argument(..., help="A loraforge image LoRA run dir."),
                     out: Path = typer.Option(..., "--out", help="Output .safetensors in kohya/A1111 format."),
                     alpha: Optional[float] = typer.Option(None, help="Override alpha (default: the run's true alpha).")):
    """Convert an image LoRA to the kohya / AUTOMATIC1111 key format (with its true alpha)."""
    from loraforge.image.kohya import export_kohya
    from loraforge.train.rundir import check_output_path

    check_output_path(out, [lora_dir], replaces=False)

    typer.echo(f"wrote {export_kohya(lora_dir, out, alpha=alpha)}")


@app.command("config-help")
def config_help():
    """Every config key with its default and meaning."""
    from loraforge.config.help import format_config_help

    typer.echo(format_config_help())


def main() -> None:
    """Console entry point: user errors → message + exit 2; Ctrl-C/SIGTERM → checkpoint + resume hint."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by peft) warns on AVX512-BF16 CPUs that an optional 4-bit kernel could not be fetched
    # from the Hub (`kernels`): a dependency's internals in every run's output, and loraforge never downloads.
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from loraforge.errors import EXIT_USER_ERROR, LoraforgeError

    try:
        app(standalone_mode=False)
    except LoraforgeError as e:
        typer.echo(e.format(), err=True)
        sys.exit(EXIT_USER_ERROR)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 — usage errors and interrupts get their own exit codes below
        from loraforge.train.loop import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            where = e.checkpoint or "the last checkpoint"
            typer.echo(f"\ninterrupted: checkpoint written to {where}\n"
                       f"resume with: loraforge train CONFIG --set resume_from_checkpoint=latest", err=True)
            sys.exit(128 + int(e.signum))
        # typer ships its own copy of click's exceptions: recognise them by shape, not by class
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error (missing argument, bad option)
            e.show()
            if getattr(e, "ctx", None) is None:  # click printed no "Try ... --help" line: say where the usage is
                typer.echo("fix: see `loraforge COMMAND --help` for the arguments and options", err=True)
            sys.exit(EXIT_USER_ERROR)
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):  # --help and friends
            sys.exit(e.exit_code)
        from loraforge.train.space import is_disk_full

        if is_disk_full(e):  # outside a checkpoint save (which says more itself): a final model, a merge, a cache
            typer.echo(f"no space left on the disk being written: {e}\nfree disk space or write to a larger disk",
                       err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
