"""TensorRT engine builds from ONNX files (TensorRT 10 and 11 Python API).

TensorRT is optional and exists only on machines with an NVIDIA GPU, so it is imported inside the functions
that need it: importing this module, ``prune-export --help`` and the CPU tests work without it, and
:func:`require_tensorrt` turns its absence into an error that says how to get it.

Pruned graphs take their kept lengths from *shape tensors* (int64 inputs such as a TopK ``K``), so an
engine needs a value range for each of those next to the shape range of each dynamic tensor input; a
missing entry is reported by name before TensorRT spends minutes building. Networks are strongly typed
(precision comes from the ONNX file), which TensorRT 11 enforces and TensorRT 10 offers as a flag.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from prune_core.errors import BuildError
from prune_core.io import atomic_write_bytes
from prune_core.manifest import Manifest

__all__ = [
    "EngineFromOnnx",
    "EnginesFromBuild",
    "SaveEngine",
    "ShapeRange",
    "ValueRange",
    "engine_file",
    "engine_from_onnx",
    "profile_for_graph",
    "require_tensorrt",
    "save_engine",
    "tensorrt_version",
]

#: ``(min, opt, max)`` shapes of a tensor input.
ShapeRange = tuple[Sequence[int], Sequence[int], Sequence[int]]
#: ``(min, opt, max)`` values of a shape-tensor input; a bare int stands for a one-value (scalar) tensor.
ValueRange = tuple[int | Sequence[int], int | Sequence[int], int | Sequence[int]]

_Triple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a :class:`BuildError` saying how to install it or what to build instead."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: the wheel is there but libnvinfer cannot load.
        raise BuildError(
            f"TensorRT is not installed ({err}): install the NVIDIA TensorRT Python package on a machine "
            "with an NVIDIA GPU (pip install 'prune-export[tensorrt]'), or build with --target onnxruntime"
        ) from err
    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None where TensorRT cannot be imported."""
    try:
        return str(require_tensorrt().__version__)
    except BuildError:
        return None


def _triple(name: str, triple: object, what: str, *, scalar_ok: bool) -> _Triple:
    """Check one ``(min, opt, max)`` entry and return it as int tuples (min <= opt <= max, same lengths)."""
    if not isinstance(triple, Sequence) or isinstance(triple, str) or len(triple) != 3:
        raise BuildError(f"{what} for {name!r} must be a (min, opt, max) triple, got {triple!r}")
    items: list[tuple[int, ...]] = []
    for item in triple:
        if scalar_ok and isinstance(item, int) and not isinstance(item, bool):
            item = (item,)
        if not isinstance(item, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in item
        ):
            raise BuildError(f"{what} for {name!r} must hold sequences of integers, got {triple!r}")
        items.append(tuple(int(v) for v in item))
    low, opt, high = items
    if not len(low) == len(opt) == len(high):
        raise BuildError(f"{what} for {name!r} must have equal lengths for min, opt and max, got {triple!r}")
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise BuildError(
            f"{what} for {name!r} must satisfy min <= opt <= max in every position, got {triple!r}"
        )
    return low, opt, high


@functools.cache
def _logger(trt: ModuleType) -> Any:
    """One TensorRT logger per process (TensorRT keeps the first one it is given)."""
    return trt.Logger(trt.Logger.WARNING)


def _network_flags(trt: ModuleType) -> int:
    """Creation flags for a strongly typed network: the TensorRT 10 flag where the enum has it, else 0.

    TensorRT 11 networks are always strongly typed; its flag, where still present, is ignored.
    """
    flags_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strongly_typed = getattr(flags_enum, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def _describe_parser_error(error: Any) -> str:
    """One line for an ONNX parser error: the node it concerns (when any) and TensorRT's description."""

    def field(method: str) -> Any:
        getter = getattr(error, method, None)
        return getter() if callable(getter) else None

    desc = field("desc") or str(error)
    node = field("node")
    if isinstance(node, int) and node >= 0:
        where = f"node {node}"
        operator, node_name = field("node_operator"), field("node_name")
        if operator:
            where += f" ({operator}"
            where += f" {node_name!r})" if node_name else ")"
        return f"{where}: {desc}"
    return str(desc)


def _set(setter: Callable[..., Any], name: str, triple: _Triple, what: str, path: Path) -> None:
    """One profile entry; TensorRT's bindings raise on an inconsistent one, which becomes one clear line."""
    try:
        setter(name, *triple)
    except (RuntimeError, ValueError, TypeError) as err:
        low, opt, high = (list(t) for t in triple)
        raise BuildError(
            f"TensorRT refused the {what} for {name!r} of {path.name} (min {low}, opt {opt}, max {high}): {err}; "
            "the ranges come from the build's manifest: rebuild it, or check them against the graph's inputs"
        ) from err


class EngineFromOnnx:
    """Loader: build a serialized TensorRT engine from an ONNX file, with one optimization profile.

    ``profile`` maps each dynamic tensor input to its ``(min, opt, max)`` shapes; ``shape_values`` maps each
    shape-tensor input (an int32/int64 input TensorRT reads as a shape, such as a TopK ``K``) to its
    ``(min, opt, max)`` values. Every dynamic input needs an entry; static inputs may be left out.
    ``workspace_gb`` caps TensorRT's scratch memory (TensorRT's default: the whole GPU). ``verbose`` turns
    on TensorRT's verbose log, which is where the reason for a failed build is found.

    Entries are checked when the loader is made; the file is parsed and the engine built on call, which
    returns the engine as bytes.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        profile: Mapping[str, ShapeRange],
        shape_values: Mapping[str, ValueRange] | None = None,
        workspace_gb: float | None = None,
        verbose: bool = False,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.profile: dict[str, _Triple] = {
            name: _triple(name, shapes, "profile shapes", scalar_ok=False) for name, shapes in profile.items()
        }
        for name, (low, _, _) in self.profile.items():
            if any(dim < 0 for dim in low):
                raise BuildError(f"profile shapes for {name!r} must not have negative dimensions, got {low}")
        self.shape_values: dict[str, _Triple] = {
            name: _triple(name, values, "shape values", scalar_ok=True)
            for name, values in (shape_values or {}).items()
        }
        if workspace_gb is not None and not workspace_gb > 0:
            raise BuildError(
                f"workspace_gb must be positive (or None for TensorRT's default), got {workspace_gb}"
            )
        self.workspace_gb = workspace_gb
        self.verbose = verbose

    def _parse(self, trt: ModuleType, builder: Any) -> tuple[Any, Any]:
        network = builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, _logger(trt))
        # parse_from_file (not parse) so the parser finds external weight files next to the ONNX file.
        ok = parser.parse_from_file(str(self.onnx_path))
        errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        if errors or not ok:
            listed = "\n  ".join(errors) or "(the parser gave no reason; rerun with verbose=True)"
            raise BuildError(
                f"TensorRT's ONNX parser rejected {self.onnx_path} ({len(errors)} error(s)):\n  {listed}\n"
                "Fix the graph (the TensorRT lint of graph_passes reports unsupported patterns) or build "
                "with --target onnxruntime"
            )
        # The parser owns weights the network points to: keep it alive until the build is done.
        return network, parser

    def _profile(self, builder: Any, network: Any) -> Any | None:
        """The optimization profile for the network's inputs; None when no input needs an entry."""
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = [tensor.name for tensor in inputs]
        unknown = sorted((set(self.profile) | set(self.shape_values)) - set(names))
        if unknown:
            raise BuildError(
                f"profile names {', '.join(unknown)} are not inputs of {self.onnx_path}; its inputs are "
                f"{', '.join(names)}"
            )
        profile = builder.create_optimization_profile()
        entries = 0
        missing: list[str] = []
        for tensor in inputs:
            name, shape = tensor.name, tuple(int(dim) for dim in tensor.shape)
            dynamic = any(dim < 0 for dim in shape)
            if tensor.is_shape_tensor:
                if name not in self.shape_values:
                    missing.append(
                        f"{name} (shape tensor {list(shape)}: give min/opt/max values in shape_values)"
                    )
                else:
                    values = self.shape_values[name]
                    count = 1 if not shape else shape[0]
                    if not dynamic and len(values[0]) != count:
                        raise BuildError(
                            f"shape values for {name!r} have {len(values[0])} value(s), but the input holds "
                            f"{count} (shape {list(shape)})"
                        )
                    _set(profile.set_shape_input, name, values, "shape values", self.onnx_path)
                    entries += 1
                if not dynamic:
                    continue
            if name in self.profile:
                low, opt, high = self.profile[name]
                if len(low) != len(shape) or any(
                    want >= 0 and not want == a == b == c
                    for want, a, b, c in zip(shape, low, opt, high, strict=True)
                ):
                    raise BuildError(
                        f"profile shapes for {name!r} ({list(low)}, {list(opt)}, {list(high)}) do not fit its "
                        f"shape {list(shape)} in {self.onnx_path} (-1 marks the dynamic dimensions)"
                    )
                _set(profile.set_shape, name, (low, opt, high), "profile shapes", self.onnx_path)
                entries += 1
            elif dynamic:
                missing.append(f"{name} (shape {list(shape)}: give min/opt/max shapes in profile)")
        if missing:
            raise BuildError(
                f"no optimization-profile entry for dynamic input(s) of {self.onnx_path}: {'; '.join(missing)}"
            )
        return profile if entries else None

    def __call__(self) -> bytes:
        """Parse, configure and build; returns the serialized engine."""
        if not self.onnx_path.is_file():
            raise BuildError(
                f"ONNX file not found: {self.onnx_path}; check the path or export the graph first"
            )
        trt = require_tensorrt()
        logger = _logger(trt)
        logger.min_severity = trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING
        builder = trt.Builder(logger)
        network, _parser = self._parse(trt, builder)
        config = builder.create_builder_config()
        if self.workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        profile = self._profile(builder, network)
        if profile is not None and config.add_optimization_profile(profile) < 0:
            raise BuildError(
                f"TensorRT rejected the optimization profile for {self.onnx_path}; check the profile "
                "against the log above (rerun with verbose=True for details)"
            )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError(
                f"TensorRT failed to build an engine from {self.onnx_path}; its log above gives the reason: "
                "rerun with verbose logging (verbose=True) to see it in full"
            )
        return bytes(serialized)


def engine_from_onnx(
    onnx_path: str | os.PathLike[str],
    *,
    profile: Mapping[str, ShapeRange],
    shape_values: Mapping[str, ValueRange] | None = None,
    workspace_gb: float | None = None,
    verbose: bool = False,
) -> bytes:
    """Build an engine at once; see :class:`EngineFromOnnx`."""
    return EngineFromOnnx(
        onnx_path, profile=profile, shape_values=shape_values, workspace_gb=workspace_gb, verbose=verbose
    )()


class SaveEngine:
    """Loader: write a serialized engine to ``path`` atomically and pass the engine on.

    ``engine`` is the bytes or a loader returning them (e.g. :class:`EngineFromOnnx`), so a build and its
    save chain as ``SaveEngine(EngineFromOnnx(...), path)()``.
    """

    def __init__(self, engine: bytes | Callable[[], bytes], path: str | os.PathLike[str]) -> None:
        self.engine = engine
        self.path = Path(path)

    def __call__(self) -> bytes:
        """Write the engine (building it first when given a loader); returns its bytes."""
        data = self.engine() if callable(self.engine) else self.engine
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise BuildError(f"refusing to write an empty or non-bytes engine to {self.path}")
        atomic_write_bytes(self.path, bytes(data))
        return bytes(data)


def save_engine(engine: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``engine`` to ``path`` atomically at once; returns the path."""
    SaveEngine(engine, path)()
    return Path(path)


# -- engines of a build directory ------------------------------------------------------------------------
def profile_for_graph(manifest: Manifest, graph: str) -> tuple[dict[str, ShapeRange], dict[str, ValueRange]]:
    """The optimization profile of one graph of a build, derived from its manifest.

    Each input with named (dynamic) dimensions gets ``(min, opt, max)`` shapes from ``shape_ranges``; each
    input listed in ``shape_values`` (int64 vectors TensorRT reads as sizes) gets its per-element value
    vectors. Whether TensorRT treats an input as a shape tensor is decided when it parses the graph;
    :class:`EngineFromOnnx` then asks for exactly the entries it needs, and an entry for an input that turns
    out not to be a shape tensor is not used.
    """
    try:
        entry = manifest.graphs[graph]
    except KeyError:
        raise BuildError(f"the build has no {graph!r} graph (it has {', '.join(sorted(manifest.graphs))})") from None
    profile: dict[str, ShapeRange] = {}
    values: dict[str, ValueRange] = {}
    for spec in entry.inputs:
        if spec.name in manifest.shape_values:
            low, opt, high = manifest.shape_values[spec.name]
            values[spec.name] = (low, opt, high)
        if all(isinstance(dim, int) for dim in spec.shape):
            continue
        triples: list[tuple[int, int, int]] = []
        for dim in spec.shape:
            if isinstance(dim, int):
                triples.append((dim, dim, dim))
                continue
            if dim not in manifest.shape_ranges:
                raise BuildError(
                    f"input {spec.name!r} of {entry.file} has the dynamic dimension {dim!r}, which the manifest's "
                    f"shape_ranges do not bound (they bound {', '.join(sorted(manifest.shape_ranges))}); rebuild "
                    "the directory with `prune-export build --target tensorrt`"
                )
            low, opt, high = manifest.shape_ranges[dim]
            triples.append((low, opt, high))
        profile[spec.name] = tuple(tuple(t[i] for t in triples) for i in range(3))  # type: ignore[assignment]
    return profile, values


def engine_file(graph: str) -> str:
    """The engine file of a graph in a build directory: ``<graph>.plan``."""
    return f"{graph}.plan"


class EnginesFromBuild:
    """Loader: one TensorRT engine per graph of a ``--target tensorrt`` build directory.

    Profiles come from the manifest (:func:`profile_for_graph`); each engine is written atomically next to
    its ONNX file as ``<graph>.plan``. On call it returns ``{graph: engine file name}``; the first graph
    TensorRT refuses raises a :class:`BuildError` naming the graph, and engines already written stay.
    """

    def __init__(
        self,
        build_dir: str | os.PathLike[str],
        manifest: Manifest,
        *,
        workspace_gb: float | None = None,
        verbose: bool = False,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        if manifest.target != "tensorrt":
            raise BuildError(
                f"{build_dir} was built for --target {manifest.target}; TensorRT engines need a build made with "
                "--target tensorrt (its graphs are linted and every dynamic shape is bounded)"
            )
        self.build_dir = Path(build_dir)
        self.manifest = manifest
        self.workspace_gb = workspace_gb
        self.verbose = verbose
        self.log = log

    def __call__(self) -> dict[str, str]:
        files: dict[str, str] = {}
        for graph in self.manifest.graphs:
            profile, values = profile_for_graph(self.manifest, graph)
            onnx_path = self.manifest.graph_path(self.build_dir, graph)
            self.log(f"building the TensorRT engine of {onnx_path.name}")
            loader = EngineFromOnnx(
                onnx_path, profile=profile, shape_values=values, workspace_gb=self.workspace_gb, verbose=self.verbose
            )
            try:
                SaveEngine(loader, self.build_dir / engine_file(graph))()
            except BuildError as err:
                raise BuildError(f"graph {graph!r}: {err}") from err
            files[graph] = engine_file(graph)
        return files


def _spec_list(parts: Mapping[str, Sequence[int]]) -> str:
    """``name:AxBxC,name2:...`` (trtexec); shape-tensor inputs give their values in the same notation."""
    return ",".join(f"{name}:{'x'.join(str(int(v)) for v in dims)}" for name, dims in parts.items())


def _poly_list(parts: Mapping[str, Sequence[int]]) -> str:
    """``name:[A,B,C] name2:[...]`` (Polygraphy); shape-tensor inputs give their values."""
    return " ".join(f"{name}:[{','.join(str(int(v)) for v in dims)}]" for name, dims in parts.items())


def tensorrt_commands(manifest: Manifest, *, workspace_gb: float | None = None) -> str:
    """A shell script that builds and times every graph's engine with ``trtexec`` and, alternatively,
    ``polygraphy``, with the manifest's optimization profiles (:func:`profile_for_graph`).

    Shape-tensor inputs (the split prefill's ``keep_counts``/``merged_counts``) are given by value: both tools
    read a shape-tensor input's profile entry as the tensor's values. Networks are strongly typed (the
    graphs carry their precision), as :class:`EngineFromOnnx` builds them.
    """
    lines = [
        "#!/usr/bin/env bash",
        "# TensorRT engines of this build, by hand: written by `prune-export build --target tensorrt` from",
        "# manifest.json's profiles (`prune-export engines .` does the same through the TensorRT Python API).",
        "# Run it in this directory on the GPU the engines are for; engines only load on the TensorRT version",
        "# and GPU that built them.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "",
    ]
    pool = f" --memPoolSize=workspace:{int(workspace_gb * 1024)}" if workspace_gb else ""
    pool_poly = f" --pool-limit workspace:{int(workspace_gb * 2**30)}" if workspace_gb else ""
    for graph, entry in manifest.graphs.items():
        profile, values = profile_for_graph(manifest, graph)
        shapes = {i: {**{n: s[i] for n, s in profile.items()}, **{n: v[i] for n, v in values.items()}} for i in range(3)}
        plan = engine_file(graph)
        lines.append(f"# {graph}: {entry.file} -> {plan}")
        if not profile and not values:
            lines.append(f"trtexec --onnx={entry.file} --stronglyTyped --saveEngine={plan}{pool}")
            lines.append(f"trtexec --loadEngine={plan} --useCudaGraph --warmUp=500 --iterations=100")
            lines.append(f"# polygraphy convert {entry.file} --convert-to trt --strongly-typed{pool_poly} -o {plan}")
        else:
            lines.append(
                f"trtexec --onnx={entry.file} --stronglyTyped --saveEngine={plan}{pool} \\\n"
                f"  --minShapes={_spec_list(shapes[0])} \\\n  --optShapes={_spec_list(shapes[1])} \\\n"
                f"  --maxShapes={_spec_list(shapes[2])}"
            )
            lines.append(f"trtexec --loadEngine={plan} --shapes={_spec_list(shapes[1])} --useCudaGraph --warmUp=500 --iterations=100")
            lines.append(
                f"# polygraphy convert {entry.file} --convert-to trt --strongly-typed{pool_poly} -o {plan} \\\n"
                f"#   --trt-min-shapes {_poly_list(shapes[0])} \\\n#   --trt-opt-shapes {_poly_list(shapes[1])} \\\n"
                f"#   --trt-max-shapes {_poly_list(shapes[2])}"
            )
        lines.append("")
    return "\n".join(lines)
