"""Commands that serve a build with Triton: ``deploy``, ``serve``, ``ask``."""

from __future__ import annotations

from pathlib import Path

import click

from prune_core import defaults

from ..options import (
    json_option,
    max_new_tokens_option,
)
from ..output import echo_answer, echo_json, log_err


# -- Triton: deploy / serve / ask ---------------------------------------------------------------------------
@click.command("deploy")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The Triton model repository to write (a new or empty directory, or --overwrite).")
@click.option("--name", default="prune_export", show_default=True,
              help="Name of the model clients call; the graph models are NAME_vision, NAME_prefill, ...")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each model (instance_group count).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance kind of the graph models (KIND_CPU / KIND_GPU).")
@max_new_tokens_option(None, "Largest answer a request may ask for [default: the build's bound].")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=defaults.MAX_IMAGE_PIXELS, show_default=True,
              help="The served model refuses a larger image (HTTP 400), read from its header before decoding.")
@click.option("--stream", is_flag=True, help="A decoupled model that streams the answer as its tokens come (gRPC).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode up to N concurrent requests together (continuous batching; at most the build's "
                   "--max-batch). N > 1 makes the model decoupled: ask it over gRPC.")
@click.option("--kv-budget-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --max-batch: the most memory the batch's KV caches may take; requests beyond it wait "
                   "[default: no budget].")
@click.option("--decode-in", type=click.Choice(["orchestrator", "bls"]), default=None,
              help="Where the batching model runs decode steps: orchestrator (decode.onnx in its own process with "
                   "ONNX Runtime; the KV caches stay there) or bls (a request to NAME_decode per step, caches sent "
                   "there and back) [default: orchestrator, bls for a TensorRT decode engine].")
@click.option("--overwrite", is_flag=True, help="Replace REPO if it exists.")
@json_option()
def deploy_cmd(build_dir: Path, repo_dir: Path, name: str, instances: int, device: str, max_new_tokens: int | None,
               max_image_pixels: int, stream: bool, max_batch: int, kv_budget_mb: float | None, decode_in: str | None,
               overwrite: bool,
               as_json: bool) -> None:
    """Write BUILD_DIR as a Triton model repository: one model per graph and the model clients call.

    Every config.pbtxt is checked with Triton's schema and against its ONNX graph before REPO appears.
    Serve REPO with the NGC Triton container (see REPO/README.md) or locally with `prune-export serve`.
    """
    from ..workflows.deploy import deploy

    result = deploy(build_dir, repo_dir, name=name, instances=instances, device=device, max_new_tokens=max_new_tokens,
                    max_image_pixels=max_image_pixels, stream=stream, max_batch=max_batch, kv_budget_mb=kv_budget_mb,
                    decode_in=decode_in, overwrite=overwrite, log=(lambda m: None) if as_json else log_err)  # fmt: skip
    if as_json:
        echo_json(result)
        return
    click.echo(f"wrote Triton repository {result['repository']}: {', '.join(result['models'])} "
               f"({result['seconds']:.1f} s); clients call {result['model']}")  # fmt: skip


@click.command("serve")
@click.argument("repos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--env", "env_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The server's Python environment (made once if missing) "
                   "[default: $PRUNE_EXPORT_TRITON_ENV or ~/.cache/prune-export/triton-server-py3.X-HASH].")
def serve_cmd(repos: tuple[Path, ...], http_port: int, grpc_port: int, metrics_port: int, env_dir: Path | None) -> None:
    """Serve Triton model repositories on 127.0.0.1 until SIGTERM or Ctrl-C (local use and tests).

    Runs the tritonserver bundled with nvidia-pytriton (Python backend only); the repositories' onnxruntime
    models are served through a small Python-based backend with ONNX Runtime. The NGC container serves the
    same directories with its native backends.
    """
    from ..workflows.deploy import serve

    code = serve(list(repos), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, env_dir=env_dir,
                 log=log_err)  # fmt: skip
    if code not in (0, -15):
        raise SystemExit(1)


@click.command("ask")
@click.argument("url")
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True, help="Image file.")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None,
              help="[default: from the URL's scheme, else http]")
@click.option("--model", default=None, help="The model to call [default: the one served that takes image and question].")
@max_new_tokens_option(None, "Largest number of answer tokens [default: the served model's].")
@click.option("--stream", is_flag=True, help="Print the answer as its pieces come (a model deployed with --stream).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to keep trying to reach a server that is still starting.")
@json_option("Print one JSON object: answer, latency_ms, model, ...")
def ask_cmd(url: str, image_path: Path, question: str, protocol: str | None, model: str | None,
            max_new_tokens: int | None, stream: bool, wait: float, as_json: bool) -> None:
    """Ask a model served by Triton (URL: http://HOST:PORT or grpc://HOST:PORT) a question about an image."""
    from ..workflows.deploy import ask

    echo_answer(lambda on_text: ask(url, image_path, question, protocol=protocol, model=model,
                                     max_new_tokens=max_new_tokens, wait=wait, on_text=on_text), stream, as_json)  # fmt: skip
