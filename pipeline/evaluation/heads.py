"""Classification heads that turn CLIP image embeddings into class logits.

A merged vision encoder is only as good as its accuracy on the users' tasks, and a task's
classes live in a head: a linear map `[C, D]` over the (normalised) image embedding. Users hold
heads in two forms, and both are read here as they are, with no conversion step:

- files: the papers' pickled `head_<Dataset>.pt` (a whole `ClassificationHead` object whose
  class lives in the authors' code), a plain state dict, or a safetensors file;
- a zero-shot head built from the pre-trained CLIP text tower, class names and templates
  (FusionBench's way, and the papers' way of making the heads in the first place).

A pickle is a program, not data. The papers' heads need the authors' module to unpickle
normally, and executing a foreign pickle to read three values would hand the file's author our
machine. `load_head_file` therefore unpickles with an allowlist: torch rebuilds its tensors, and
every other class becomes an inert stand-in that can receive state but never run code.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import struct
import types
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import InputError
from pipeline.io import storage


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: compare fields explicitly
class Head:
    """A frozen linear classifier over image embeddings: `normalize(x) @ weight.T + bias`."""

    weight: torch.Tensor  # [C, D] float32, contiguous
    bias: torch.Tensor | None  # [C] float32 or None
    normalize: bool  # L2-normalise the image embeddings before the linear map

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.weight.dtype != torch.float32:
            raise ValueError(f"Head.weight must be a 2-D float32 tensor, got "
                             f"{tuple(self.weight.shape)} {self.weight.dtype}")
        if self.bias is not None and (self.bias.dtype != torch.float32
                                      or tuple(self.bias.shape) != (self.num_classes,)):
            raise ValueError(f"Head.bias must be float32 of shape ({self.num_classes},), got "
                             f"{tuple(self.bias.shape)} {self.bias.dtype}")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C): normalize(embeds) @ W.T + b (normalize only if self.normalize).

        Computed in float32 whatever the embeds' dtype: embeddings may come out of bf16
        autocast, and a bf16 matmul against a head scaled by ~100 would move argmaxes."""
        if embeds.dim() != 2 or embeds.shape[1] != self.dim:
            raise ValueError(f"head expects image embeddings of shape (N, {self.dim}), got "
                             f"{tuple(embeds.shape)}")
        x = embeds.float()
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        weight = self.weight.to(x.device)
        bias = None if self.bias is None else self.bias.to(x.device)
        return torch.nn.functional.linear(x, weight, bias)


def load_head_file(location: str) -> Head:
    """Read a head from a local path or a pyarrow.fs URI: `.safetensors`, or anything else as
    a zip-format torch file (a pickled `ClassificationHead` or a `{weight, bias}` state dict)."""
    data = storage.read_bytes(location)
    if location.lower().endswith(".safetensors"):
        return _head_from_safetensors(location, data)
    return _head_from_torch_file(location, data)


# --- safetensors -------------------------------------------------------------------------------

def _head_from_safetensors(location: str, data: bytes) -> Head:
    import safetensors.torch

    metadata = _safetensors_metadata(location, data)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # SafetensorError and friends: the file is not what it claims
        raise InputError(f"{location}: not a readable safetensors file ({_one_line(exc)})") \
            from None
    expected = "expected a 2-D tensor 'weight' [classes, dim] and an optional 'bias' [classes]"
    if "weight" in tensors:
        extra = sorted(set(tensors) - {"weight", "bias"})
        if extra:
            raise InputError(f"{location}: unexpected tensors {extra}; {expected}")
        weight, bias = tensors["weight"], tensors.get("bias")
    else:
        matrices = sorted(name for name, t in tensors.items() if t.dim() == 2)
        if len(matrices) != 1 or len(tensors) != 1:
            found = {name: tuple(t.shape) for name, t in sorted(tensors.items())}
            raise InputError(f"{location}: cannot tell which tensor is the head (found "
                             f"{found or 'no tensors'}); {expected}")
        weight, bias = tensors[matrices[0]], None
    flag = metadata.get("normalize", "true").strip().lower()
    if flag not in ("true", "false"):
        raise InputError(f"{location}: metadata 'normalize' is {metadata['normalize']!r}, "
                         f"expected 'true' or 'false'")
    return _make_head(location, weight, bias, flag == "true")


def _safetensors_metadata(location: str, data: bytes) -> dict[str, str]:
    """The header's `__metadata__`: `safe_open` reads only files, so parse the header here
    (8-byte little-endian length, then that many bytes of JSON)."""
    if len(data) < 8:
        raise InputError(f"{location}: not a safetensors file ({len(data)} bytes, too short "
                         f"for a header)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise InputError(f"{location}: not a safetensors file (header length {length} exceeds "
                         f"the file's {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise InputError(f"{location}: not a safetensors file (header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{location}: safetensors __metadata__ must map strings to strings")
    return metadata


# --- restricted unpickling of torch files --------------------------------------------------------

class _Refused(Exception):
    """A pickle asked for something a head does not need (calling a foreign global)."""

    def __init__(self, qualname: str, how: str):
        super().__init__(f"{qualname} ({how})")
        self.qualname = qualname


class _StandInMeta(type):
    """Calling a stand-in class is what `REDUCE` does (`os.system("...")` in a pickle): refuse."""

    _qualname: str

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(cls._qualname, "the file asks to call it")


class _StandIn(metaclass=_StandInMeta):
    """What a foreign class becomes: NEWOBJ may create it without arguments and BUILD may give
    it a state dict, once; that is how pickle rebuilds a plain object, and all a head needs."""

    _qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        if args or kwargs:
            raise _Refused(cls._qualname, "the file constructs it with arguments")
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if "_state" in self.__dict__:
            raise _Refused(type(self)._qualname, "the file sets its state twice")
        self.__dict__["_state"] = state


def _rebuild_tensor_v2(storage_: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, metadata: Any = None
                       ) -> torch.Tensor:
    """torch's own rebuild, for storages from the archive only and without hooks/attributes."""
    if not isinstance(storage_, torch.storage.TypedStorage):
        raise _Refused("torch._utils._rebuild_tensor_v2", "its storage is not from the file")
    if backward_hooks or metadata:
        raise _Refused("torch._utils._rebuild_tensor_v2", "the tensor carries hooks or state")
    return torch._utils._rebuild_tensor_v2(storage_, storage_offset, size, stride, False,
                                           collections.OrderedDict())


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
    """A Parameter's payload as a plain tensor: the head is frozen, hooks would be code."""
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise _Refused("torch._utils._rebuild_parameter", "not a plain tensor parameter")
    return data


# What torch.save (protocol 2) of an nn.Linear subclass refers to, besides `torch.*Storage`
# names, which torch's loader resolves itself before asking our `find_class`.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 spells builtins the Python 2 way
}


class _RestrictedUnpickler(pickle.Unpickler):
    """`find_class` hands out only the allowlist; every other global is a fresh stand-in."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.foreign: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        qualname = f"{module}.{name}"
        if qualname not in self.foreign:
            self.foreign.append(qualname)
        return _StandInMeta(name, (_StandIn,), {"_qualname": qualname})


def _refuse_legacy(*args: Any, **kwargs: Any) -> Any:
    raise _Refused("legacy torch format", "not read")


class _Recorder:
    """Keeps the unpickler torch created, to name the foreign globals in an error."""

    def __init__(self) -> None:
        self.unpicklers: list[_RestrictedUnpickler] = []

    def module(self) -> types.ModuleType:
        recorder = self

        class Unpickler(_RestrictedUnpickler):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                recorder.unpicklers.append(self)

        module = types.ModuleType("pipeline_restricted_pickle")
        module.Unpickler = Unpickler  # type: ignore[attr-defined]
        module.load = _refuse_legacy  # type: ignore[attr-defined]
        return module

    @property
    def foreign(self) -> list[str]:
        return [name for u in self.unpicklers for name in u.foreign]


def _check_container(location: str, data: bytes) -> None:
    """Only the zip format goes to torch: torch routes anything else to its legacy loader (and
    a zip holding TorchScript to `torch.jit.load`), neither of which we want to run."""
    hint = "expected a zip-format torch.save file or a .safetensors file"
    if not data.startswith(b"PK\x03\x04"):
        raise InputError(f"{location}: not a zip-format torch file (a plain pickle or torch's "
                         f"legacy format, which are not read); {hint}")
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{location}: damaged zip archive ({_one_line(exc)}); {hint}") from None
    records = {name.split("/", 1)[1] for name in names if "/" in name}
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        raise InputError(f"{location}: a TorchScript archive, not a pickled head; {hint}")
    if "data.pkl" not in records:
        raise InputError(f"{location}: zip archive without data.pkl; {hint}")


def _head_from_torch_file(location: str, data: bytes) -> Head:
    _check_container(location, data)
    recorder = _Recorder()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                         pickle_module=recorder.module())
    except _Refused as exc:
        raise InputError(f"{location}: not a classification head: carries {exc}; refusing to "
                         f"run code from a pickle") from None
    except Exception as exc:  # anything else the archive's pickle makes torch or pickle raise
        foreign = recorder.foreign
        carries = f"carries {', '.join(foreign)}; " if foreign else ""
        raise InputError(f"{location}: not a classification head: {carries}unreadable "
                         f"({_one_line(exc)})") from None
    if isinstance(obj, _StandIn):
        return _head_from_object(location, obj)
    if isinstance(obj, dict):
        return _head_from_state_dict(location, obj)
    raise InputError(f"{location}: not a classification head: holds a {type(obj).__name__}; "
                     f"expected a pickled ClassificationHead or a {{'weight', 'bias'}} dict")


def _head_from_state_dict(location: str, state: dict[Any, Any]) -> Head:
    keys = set(state)
    if "weight" not in keys or not keys <= {"weight", "bias"}:
        raise InputError(f"{location}: state dict has keys {sorted(map(str, keys))}; expected "
                         f"'weight' [classes, dim] and an optional 'bias' [classes]")
    for key, value in state.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise InputError(f"{location}: state dict entry {key!r} is a "
                             f"{_describe(value)}, expected a tensor")
    return _make_head(location, state["weight"], state.get("bias"), True)


# nn.Module bookkeeping that a plain Linear carries; each must be empty for a frozen head.
_MUST_BE_EMPTY = ("_buffers", "_modules")


def _head_from_object(location: str, obj: _StandIn) -> Head:
    qualname = type(obj)._qualname
    state = obj.__dict__.get("_state")
    if not isinstance(state, dict):
        raise InputError(f"{location}: not a classification head: {qualname} has no attribute "
                         f"dict (state {_describe(state)})")
    for key, value in state.items():
        nested = next(_stand_ins(value), None)
        if nested is not None:
            raise InputError(f"{location}: not a classification head: carries "
                             f"{type(nested)._qualname} (in {qualname}.{key})")
    params = state.get("_parameters")
    if not isinstance(params, dict) or "weight" not in params:
        raise InputError(f"{location}: not a classification head: {qualname} has no "
                         f"_parameters['weight']; expected an nn.Linear-like head")
    extra = sorted(str(k) for k in set(params) - {"weight", "bias"})
    if extra:
        raise InputError(f"{location}: not a classification head: {qualname} has extra "
                         f"parameters {extra}")
    for key, value in state.items():
        if key == "_parameters":
            continue
        if key in _MUST_BE_EMPTY and value:
            raise InputError(f"{location}: not a classification head: {qualname}.{key} is "
                             f"not empty ({sorted(map(str, value))})")
        if not _is_simple(value):
            raise InputError(f"{location}: not a classification head: {qualname}.{key} holds "
                             f"a {_describe(value)}")
    normalize = state.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InputError(f"{location}: {qualname}.normalize is {normalize!r}, expected a bool")
    for key in ("weight", "bias"):
        value = params.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise InputError(f"{location}: {qualname}.{key} is a {_describe(value)}, "
                             f"expected a tensor")
    return _make_head(location, params["weight"], params.get("bias"), normalize)


def _stand_ins(value: Any, depth: int = 0) -> Iterator[_StandIn | _StandInMeta]:
    """Stand-ins anywhere inside a value (a nested module, a smuggled object or class)."""
    if isinstance(value, (_StandIn, _StandInMeta)):
        yield value
    elif depth < 32 and isinstance(value, dict):
        for item in (*value.keys(), *value.values()):
            yield from _stand_ins(item, depth + 1)
    elif depth < 32 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _stand_ins(item, depth + 1)


def _is_simple(value: Any, depth: int = 0) -> bool:
    """Plain data: what module bookkeeping and hyper-parameters are; never tensors or objects."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if depth < 8 and isinstance(value, dict):
        return all(_is_simple(k, depth + 1) and _is_simple(v, depth + 1)
                   for k, v in value.items())
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_simple(v, depth + 1) for v in value)
    return False


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, _StandIn):
        return type(value)._qualname
    if isinstance(value, _StandInMeta):
        return f"class {value._qualname}"
    return type(value).__name__


# --- common validation ----------------------------------------------------------------------------

def _make_head(location: str, weight: torch.Tensor, bias: torch.Tensor | None,
               normalize: bool) -> Head:
    """Check shapes and dtypes the way a user can act on, and return plain float32 tensors."""
    if weight.dim() != 2:
        raise InputError(f"{location}: head weight has shape {tuple(weight.shape)}, expected "
                         f"2-D [classes, dim]")
    if not weight.is_floating_point():
        raise InputError(f"{location}: head weight has dtype {weight.dtype}, expected a float "
                         f"dtype")
    classes = int(weight.shape[0])
    if classes == 0 or weight.shape[1] == 0:
        raise InputError(f"{location}: head weight has shape {tuple(weight.shape)}, expected "
                         f"at least one class and one dimension")
    if bias is not None:
        if tuple(bias.shape) != (classes,):
            raise InputError(f"{location}: head bias has shape {tuple(bias.shape)}, expected "
                             f"({classes},) to match weight {tuple(weight.shape)}")
        if not bias.is_floating_point():
            raise InputError(f"{location}: head bias has dtype {bias.dtype}, expected a float "
                             f"dtype")
    plain_weight = _plain(weight)
    plain_bias = None if bias is None else _plain(bias)
    for name, t in (("weight", plain_weight), ("bias", plain_bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise InputError(f"{location}: head {name} contains NaN or infinite values")
    return Head(weight=plain_weight, bias=plain_bias, normalize=normalize)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A fresh float32 contiguous tensor: no Parameter, no autograd history, no shared storage
    with a buffer the caller might reuse."""
    return t.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


# --- zero-shot heads -----------------------------------------------------------------------------

_TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def zero_shot_head(clip_dir: str, classnames: Sequence[str], templates: Sequence[str],
                   device: str = "cpu", batch_size: int = 256) -> Head:
    """The zero-shot head of a full Hugging Face CLIPModel directory (local), as both papers
    and FusionBench build it: each class's templates go through the text tower with its
    projection, each embedding is L2-normalised, the mean over templates is re-normalised, and
    the stacked [C, D] matrix is scaled by `logit_scale.exp()`.

    Every sequence is padded to the text tower's full context length, so a class's row does not
    depend on which other texts share its batch."""
    names = _check_classnames(clip_dir, classnames)
    fills = [_template_filler(clip_dir, t) for t in _check_templates(clip_dir, templates)]
    text_config = _check_clip_dir(clip_dir)
    logit_scale = _read_logit_scale(clip_dir)
    model = _load_text_model(clip_dir, text_config).to(device).float().eval()
    tokenizer = _load_tokenizer(clip_dir)
    context = int(text_config.max_position_embeddings)
    texts = [fill(name) for name in names for fill in fills]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding="max_length",
                              max_length=context, truncation=True, return_tensors="pt")
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device))
            chunks.append(out.text_embeds.float().cpu())
        embeds = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
        means = embeds.view(len(names), len(fills), -1).mean(dim=1)
        weight = torch.nn.functional.normalize(means, dim=-1) * logit_scale.exp()
    return Head(weight=weight.clone().contiguous(), bias=None, normalize=True)


def _check_classnames(clip_dir: str, classnames: Sequence[str]) -> list[str]:
    names = [classnames] if isinstance(classnames, str) else list(classnames)
    if not names:
        raise InputError(f"{clip_dir}: zero-shot head needs at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise InputError(f"{clip_dir}: class names must be non-empty strings, got {bad[:3]!r}")
    return names


def _check_templates(clip_dir: str, templates: Sequence[str]) -> list[str]:
    found = [templates] if isinstance(templates, str) else list(templates)
    if not found:
        raise InputError(f"{clip_dir}: zero-shot head needs at least one template, e.g. "
                         f"'a photo of a {{}}.'")
    return found


def _template_filler(clip_dir: str, template: Any) -> Callable[[str], str]:
    """Templates name the class with `{}` or `{c}`; plain replacement (not str.format), so
    other braces in a template stay as written."""
    if not isinstance(template, str) or ("{}" not in template and "{c}" not in template):
        raise InputError(f"{clip_dir}: zero-shot template {template!r} has no '{{}}' or "
                         f"'{{c}}' placeholder for the class name")
    return lambda name: template.replace("{c}", name).replace("{}", name)


def _check_clip_dir(clip_dir: str) -> Any:
    """The directory's CLIP text config, or one line on what is missing. `projection_dim` is
    taken from the top level, which is what CLIPModel sizes `text_projection` with."""
    from transformers import CLIPConfig

    if storage.is_uri(clip_dir):
        raise InputError(f"{clip_dir}: the CLIP model for zero-shot heads must be a local "
                         f"directory")
    if not os.path.isdir(clip_dir):
        raise InputError(f"{clip_dir}: no such directory (expected a Hugging Face CLIPModel "
                         f"directory with config.json, weights and tokenizer files)")
    config_path = os.path.join(clip_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{clip_dir}: no config.json; expected a Hugging Face CLIPModel "
                         f"directory") from None
    except ValueError as exc:
        raise InputError(f"{config_path}: not valid JSON ({_one_line(exc)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "clip" or not isinstance(raw.get("text_config"), dict):
        raise InputError(f"{clip_dir}: no text tower (config.json model_type {model_type!r}); "
                         f"a zero-shot head needs the full CLIPModel directory (model_type "
                         f"'clip' with text_config), not a vision-only model")
    missing_tokenizer = [" and ".join(s) for s in _TOKENIZER_SETS
                         if not all(os.path.isfile(os.path.join(clip_dir, n)) for n in s)]
    if len(missing_tokenizer) == len(_TOKENIZER_SETS):
        raise InputError(f"{clip_dir}: no tokenizer files (expected vocab.json and merges.txt, "
                         f"or tokenizer.json)")
    if not any(os.path.isfile(os.path.join(clip_dir, n)) for n in _WEIGHT_FILES):
        raise InputError(f"{clip_dir}: no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    try:
        config = CLIPConfig.from_pretrained(clip_dir, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{config_path}: not a valid CLIP config ({_one_line(exc)})") from None
    text_config: Any = config.text_config
    text_config.projection_dim = config.projection_dim
    return text_config


def _read_logit_scale(clip_dir: str) -> torch.Tensor:
    """`logit_scale` lives outside the text tower, so read it straight from the weights."""
    from safetensors import safe_open

    path = os.path.join(clip_dir, "model.safetensors")
    index = os.path.join(clip_dir, "model.safetensors.index.json")
    try:
        if os.path.isfile(index) and not os.path.isfile(path):
            with open(index, encoding="utf-8") as f:
                shard = json.load(f).get("weight_map", {}).get("logit_scale")
            if shard is None:
                raise InputError(f"{index}: no logit_scale in the weight map; a zero-shot head "
                                 f"needs the full CLIPModel checkpoint")
            path = os.path.join(clip_dir, shard)
        if os.path.isfile(path):
            with safe_open(path, "pt") as f:
                if "logit_scale" not in f.keys():
                    raise InputError(f"{path}: no logit_scale tensor; a zero-shot head needs "
                                     f"the full CLIPModel checkpoint")
                value = f.get_tensor("logit_scale")
        else:
            path = os.path.join(clip_dir, "pytorch_model.bin")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if "logit_scale" not in state:
                raise InputError(f"{path}: no logit_scale tensor; a zero-shot head needs the "
                                 f"full CLIPModel checkpoint")
            value = state["logit_scale"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read logit_scale ({_one_line(exc)})") from None
    if value.numel() != 1 or not value.is_floating_point():
        raise InputError(f"{path}: logit_scale has shape {tuple(value.shape)} and dtype "
                         f"{value.dtype}, expected one float")
    return value.detach().float().reshape(())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers reports the vision weights a text model skips as a warning table and shows
    a progress bar; neither is news here. Restores the caller's settings afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_text_model(clip_dir: str, text_config: Any) -> torch.nn.Module:
    """Only the text tower and its projection (the vision tower's weights are skipped): every
    one of their weights must come from the checkpoint, none left at random init."""
    from transformers import CLIPTextModelWithProjection

    try:
        with _quiet_transformers():
            loaded: Any = CLIPTextModelWithProjection.from_pretrained(
                clip_dir, config=text_config, local_files_only=True, output_loading_info=True,
                dtype=torch.float32)
        model, info = loaded
    except Exception as exc:
        raise InputError(f"{clip_dir}: cannot load the CLIP text tower ({_one_line(exc)})") \
            from None
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        shown = ", ".join(map(str, missing[:4])) + (" ..." if len(missing) > 4 else "")
        raise InputError(f"{clip_dir}: the checkpoint lacks text-tower weights ({shown}); a "
                         f"zero-shot head needs the full CLIPModel checkpoint")
    return model


def _load_tokenizer(clip_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{clip_dir}: cannot load the tokenizer ({_one_line(exc)})") from None
