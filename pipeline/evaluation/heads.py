"""Classification heads that turn CLIP image embeddings into class logits.

A merged vision encoder is only as good as its accuracy on the users' tasks, and a task's
classes live in a head: a linear map `[C, D]` over the (normalised) image embedding. Users hold
heads in two forms, and both are read here as they are, with no conversion step:

- files: the papers' pickled `head_<Dataset>.pt` (a whole `ClassificationHead` object whose
  class lives in the authors' code), a plain state dict, or a safetensors file;
- a zero-shot head built from the pre-trained CLIP text tower, class names and templates
  (`zero_shot.py`).

A pickle is a program, not data. The papers' heads need the authors' module to unpickle
normally, and executing a foreign pickle to read three values would hand the file's author our
machine. `load_head_file` therefore unpickles with an allowlist: torch rebuilds its tensors, and
every other class becomes an inert stand-in that can receive state but never run code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import InputError, one_line
from pipeline.io import storage
from pipeline.io.safetensors_io import SafetensorsFile


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

    def to(self, device: torch.device | str) -> Head:
        """The same head on `device`: moved once, not on every batch."""
        bias = None if self.bias is None else self.bias.to(device)
        return dataclasses.replace(self, weight=self.weight.to(device), bias=bias)

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
    if location.lower().endswith(".safetensors"):
        return _head_from_safetensors(location)
    return _head_from_torch_file(location, storage.read_bytes(location))


# --- safetensors -------------------------------------------------------------------------------

def _head_from_safetensors(location: str) -> Head:
    with SafetensorsFile(location) as f:  # a bad header is a one-line CorruptFileError
        metadata = f.metadata
        tensors = {key: f.read(key) for key in f.entries}
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
        raise InputError(f"{location}: damaged zip archive ({one_line(exc)}); {hint}") from None
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
                         f"({one_line(exc)})") from None
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

