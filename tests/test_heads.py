"""Classification heads: the papers' pickled heads read without their code (and without running
any), safetensors heads, and zero-shot heads from a tiny local CLIP."""

from __future__ import annotations

import os
import pickle
import pickletools
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from clip_fixtures import make_tiny_clip_dir, tiny_clip_config, write_tokenizer_files
from safetensors.torch import save_file

from pipeline.errors import InputError
from pipeline.evaluation.heads import Head, load_head_file
from pipeline.evaluation.zero_shot import zero_shot_head

__all__ = ["make_tiny_clip_dir"]  # other test files may import it from here too

# The authors' module, as in the task-vectors repository's src/modeling.py (written from its
# description: an nn.Linear subclass with a `normalize` flag and zero bias).
AUTHORS_MODULE = textwrap.dedent("""
    import torch

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            output_size, input_size = weights.shape
            super().__init__(input_size, output_size)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(
                biases.clone() if biases is not None else torch.zeros_like(self.bias))

        def forward(self, inputs):
            if self.normalize:
                inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    class Payload:
        def __init__(self, command):
            self.command = command

        def __reduce__(self):
            import os
            return (os.system, (self.command,))

    class Extra:
        pass
""")


@pytest.fixture
def authors_code(tmp_path):
    """Import the authors' module from tmp_path under `src.modeling` and
    `src.models.modeling`; afterwards it is gone from sys.modules and sys.path, as on the
    machine that evaluates."""
    root = tmp_path / "authors"
    for package in ("src", "src/models"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "src" / "modeling.py").write_text(AUTHORS_MODULE)
    (root / "src" / "models" / "modeling.py").write_text(AUTHORS_MODULE)

    def forget() -> None:
        for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
            del sys.modules[name]
        while str(root) in sys.path:
            sys.path.remove(str(root))

    forget()
    sys.path.insert(0, str(root))
    import importlib
    modules = {name: importlib.import_module(name) for name in ("src.modeling",
                                                                "src.models.modeling")}
    yield modules, forget
    forget()


def _save_authors_head(modules, module_name, path, weight, bias=None, normalize=True,
                       mutate=None):
    head = modules[module_name].ClassificationHead(normalize, weight, bias)
    if mutate is not None:
        mutate(head, modules[module_name])
    torch.save(head, path)
    return head


@pytest.mark.parametrize("module_name", ["src.modeling", "src.models.modeling"])
def test_pickled_head_loads_without_the_authors_code(tmp_path, authors_code, module_name):
    modules, forget = authors_code
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 12, generator=gen)
    path = tmp_path / "head_Cars.pt"
    head = _save_authors_head(modules, module_name, path, weight)
    embeds = torch.randn(40, 12, generator=gen)
    with torch.no_grad():
        expected = head(embeds)  # the authors' own forward, while their code is importable
    forget()
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)

    loaded = load_head_file(str(path))
    assert type(loaded.weight) is torch.Tensor and loaded.weight.dtype == torch.float32
    assert loaded.weight.is_contiguous() and not loaded.weight.requires_grad
    assert torch.equal(loaded.weight, weight)
    assert loaded.bias is not None
    assert torch.equal(loaded.bias, torch.zeros(7))
    assert loaded.normalize is True
    assert (loaded.num_classes, loaded.dim) == (7, 12)
    torch.testing.assert_close(loaded.logits(embeds), expected, rtol=0, atol=1e-5)


def test_pickled_head_keeps_normalize_false_and_bias(tmp_path, authors_code):
    modules, forget = authors_code
    weight, bias = torch.randn(3, 5), torch.randn(3)
    path = tmp_path / "head.pt"
    _save_authors_head(modules, "src.modeling", path, weight, bias, normalize=False)
    forget()
    loaded = load_head_file(str(path))
    assert loaded.normalize is False
    assert loaded.bias is not None
    assert torch.equal(loaded.weight, weight) and torch.equal(loaded.bias, bias)


def test_torch_save_of_a_head_uses_only_the_allowlisted_globals(tmp_path, authors_code):
    """What torch.save emits for an nn.Linear subclass: if torch changes it, the allowlist
    in heads.py must follow."""
    modules, _ = authors_code
    path = tmp_path / "head.pt"
    _save_authors_head(modules, "src.modeling", path, torch.randn(3, 4))
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    found = {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data)
             if op.name == "GLOBAL"}
    assert found == {"src.modeling.ClassificationHead", "torch._utils._rebuild_parameter",
                     "torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
                     "collections.OrderedDict", "__builtin__.set"}


def test_pickled_and_safetensors_heads_give_identical_logits(tmp_path, authors_code):
    modules, forget = authors_code
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(10, 16, generator=gen) * 30
    _save_authors_head(modules, "src.modeling", tmp_path / "head.pt", weight)
    forget()
    save_file({"weight": weight, "bias": torch.zeros(10)}, str(tmp_path / "head.safetensors"))
    pickled = load_head_file(str(tmp_path / "head.pt"))
    safe = load_head_file(str(tmp_path / "head.safetensors"))
    embeds = torch.randn(500, 16, generator=gen)
    a, b = pickled.logits(embeds), safe.logits(embeds)
    assert torch.equal(a, b)
    counts_a = torch.bincount(a.argmax(1), minlength=10)
    assert torch.equal(counts_a, torch.bincount(b.argmax(1), minlength=10))
    # Independent reference: normalise, then the linear map.
    reference = (embeds / embeds.norm(dim=1, keepdim=True)) @ weight.T
    torch.testing.assert_close(a, reference, rtol=0, atol=1e-4)
    assert counts_a.sum() == 500 and (counts_a > 0).sum() > 3


def test_plain_state_dict_file(tmp_path):
    weight, bias = torch.randn(4, 6), torch.randn(4)
    torch.save({"weight": weight, "bias": bias}, tmp_path / "sd.pt")
    loaded = load_head_file(str(tmp_path / "sd.pt"))
    assert loaded.bias is not None
    assert torch.equal(loaded.weight, weight) and torch.equal(loaded.bias, bias)
    assert loaded.normalize is True
    torch.save(torch.nn.Linear(6, 4).half().state_dict(), tmp_path / "half.bin")
    assert load_head_file(str(tmp_path / "half.bin")).weight.dtype == torch.float32
    torch.save({"weight": weight, "scale": torch.ones(1)}, tmp_path / "extra.pt")
    with pytest.raises(InputError, match=r"extra\.pt: state dict has keys \['scale', 'weight'\]"):
        load_head_file(str(tmp_path / "extra.pt"))


def _assert_refused(path, match, marker):
    with pytest.raises(InputError, match=match) as info:
        load_head_file(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert not marker.exists(), "the pickle ran code"
    return message


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, authors_code):
    modules, forget = authors_code
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = modules["src.modeling"].Payload(command)
    torch.save(payload, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload))
    torch.save(payload, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"weight": torch.randn(2, 3), "bias": payload}, tmp_path / "evil_dict.pt")
    _save_authors_head(modules, "src.modeling", tmp_path / "evil_attr.pt", torch.randn(2, 3),
                       mutate=lambda head, m: setattr(head, "payload", m.Payload(command)))
    forget()
    system = "posix.system" if os.name == "posix" else "nt.system"
    _assert_refused(tmp_path / "evil.pt", rf"not a classification head: carries {system}",
                    marker)
    _assert_refused(tmp_path / "evil_dict.pt", f"carries {system}", marker)
    _assert_refused(tmp_path / "evil_attr.pt", f"carries {system}", marker)
    _assert_refused(tmp_path / "evil.pkl", "not a zip-format torch file", marker)
    _assert_refused(tmp_path / "legacy.pt", "not a zip-format torch file", marker)
    # The refusal is ours, not an accident: the plain pickle really runs the command.
    pickle.loads((tmp_path / "evil.pkl").read_bytes())
    assert marker.exists()


def test_heads_carrying_other_objects_are_refused(tmp_path, authors_code):
    modules, forget = authors_code
    marker = tmp_path / "never"
    _save_authors_head(modules, "src.modeling", tmp_path / "extra.pt", torch.randn(2, 3),
                       mutate=lambda head, m: setattr(head, "extra", m.Extra()))
    _save_authors_head(modules, "src.modeling", tmp_path / "sub.pt", torch.randn(2, 3),
                       mutate=lambda head, m: head.add_module("inner",
                                                              torch.nn.Linear(3, 3)))
    _save_authors_head(modules, "src.modeling", tmp_path / "buffer.pt", torch.randn(2, 3),
                       mutate=lambda head, m: head.register_buffer("scale", torch.ones(1)))
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "seq.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(tmp_path / "script.pt"))
    forget()
    message = _assert_refused(tmp_path / "extra.pt", "not a classification head: carries "
                              r"src\.modeling\.Extra", marker)
    assert "ClassificationHead.extra" in message
    _assert_refused(tmp_path / "sub.pt", r"carries torch\.nn\.modules\.linear\.Linear", marker)
    _assert_refused(tmp_path / "buffer.pt", r"_buffers is not empty \(\['scale'\]\)", marker)
    _assert_refused(tmp_path / "seq.pt", r"carries torch\.nn\.modules\.linear\.Linear", marker)
    _assert_refused(tmp_path / "script.pt", "TorchScript archive", marker)


def test_pickled_heads_with_bad_shapes(tmp_path, authors_code):
    modules, forget = authors_code

    def one_d(head, m):
        head.weight = torch.nn.Parameter(torch.randn(5))

    def long_bias(head, m):
        head.bias = torch.nn.Parameter(torch.zeros(4))

    def int_weight(head, m):
        head.weight = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.int64),
                                         requires_grad=False)

    def int_normalize(head, m):
        head.normalize = 1

    cases = {"one_d": (one_d, r"head weight has shape \(5,\), expected 2-D"),
             "long_bias": (long_bias, r"head bias has shape \(4,\), expected \(3,\)"),
             "int_weight": (int_weight, r"head weight has dtype torch\.int64"),
             "int_normalize": (int_normalize, r"normalize is 1, expected a bool")}
    for name, (mutate, _) in cases.items():
        _save_authors_head(modules, "src.modeling", tmp_path / f"{name}.pt",
                           torch.randn(3, 2), mutate=mutate)
    forget()
    for name, (_, match) in cases.items():
        _assert_refused(tmp_path / f"{name}.pt", match, tmp_path / "never")
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 not really a zip")
    _assert_refused(tmp_path / "garbage.pt", "damaged zip archive", tmp_path / "never")
    _assert_refused(tmp_path / "missing.pt", "no such file", tmp_path / "never")


def test_safetensors_heads(tmp_path):
    weight, bias = torch.randn(6, 8), torch.randn(6)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "wb.safetensors"))
    head = load_head_file(str(tmp_path / "wb.safetensors"))
    assert head.bias is not None
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)
    assert head.normalize is True

    save_file({"classifier": weight.to(torch.bfloat16)}, str(tmp_path / "one.safetensors"),
              metadata={"normalize": "false"})
    head = load_head_file(str(tmp_path / "one.safetensors"))
    assert head.bias is None and head.normalize is False
    assert head.weight.dtype == torch.float32
    assert torch.equal(head.weight, weight.to(torch.bfloat16).float())
    embeds = torch.randn(9, 8)
    torch.testing.assert_close(head.logits(embeds), embeds @ head.weight.T)

    save_file({"a": weight, "b": weight.clone()}, str(tmp_path / "two.safetensors"))
    save_file({"weight": weight, "bias": torch.zeros(5)}, str(tmp_path / "bias.safetensors"))
    save_file({"weight": weight.long()}, str(tmp_path / "int.safetensors"))
    save_file({"bias": bias}, str(tmp_path / "vector.safetensors"))
    save_file({"weight": weight}, str(tmp_path / "flag.safetensors"), metadata={"normalize": "1"})
    (tmp_path / "junk.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}xxxx")
    never = tmp_path / "never"
    _assert_refused(tmp_path / "two.safetensors", r"cannot tell which tensor is the head", never)
    _assert_refused(tmp_path / "bias.safetensors", r"bias has shape \(5,\), expected \(6,\)",
                    never)
    _assert_refused(tmp_path / "int.safetensors", r"dtype torch\.int64, expected a float", never)
    _assert_refused(tmp_path / "vector.safetensors", r"cannot tell which tensor", never)
    _assert_refused(tmp_path / "flag.safetensors", r"metadata 'normalize' is '1'", never)
    _assert_refused(tmp_path / "junk.safetensors", r"header is not valid JSON", never)


def test_head_from_object_store(tmp_path, s3_prefix):
    from pipeline.io import storage

    weight = torch.randn(3, 4)
    save_file({"weight": weight}, str(tmp_path / "h.safetensors"))
    torch.save({"weight": weight}, tmp_path / "h.pt")
    for name in ("h.safetensors", "h.pt"):
        uri = f"{s3_prefix}/{name}"
        storage.write_bytes(uri, (tmp_path / name).read_bytes())
        assert torch.equal(load_head_file(uri).weight, weight)
    with pytest.raises(InputError, match=rf"^{s3_prefix}/nope\.pt: no such file"):
        load_head_file(f"{s3_prefix}/nope.pt")


def test_logits_in_float32_for_bf16_embeddings():
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(5, generator=gen)
    head = Head(weight=torch.randn(5, 8, generator=gen) * 100, bias=bias, normalize=True)
    embeds = torch.randn(16, 8, generator=gen).to(torch.bfloat16)
    out = head.logits(embeds)
    assert out.dtype == torch.float32
    x = embeds.double()
    reference = (x / x.norm(dim=1, keepdim=True)) @ head.weight.double().T + bias.double()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        head.logits(torch.randn(2, 7))


# --- zero-shot heads -----------------------------------------------------------------------------

CLASSES = ["cat", "dog", "sea lion", "a photo"]
TEMPLATES = ["a photo of a {}.", "itap of a {c}.", "{} in the wild"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip_dir(tmp_path_factory.mktemp("clip") / "clip", projection_dim=12)


@pytest.fixture(scope="module")
def old_eos_clip(tmp_path_factory):
    """The OpenAI checkpoints' config says eos_token_id 2 (pooling at the highest id)."""
    return make_tiny_clip_dir(tmp_path_factory.mktemp("clip") / "old_eos", projection_dim=12,
                              seed=1, eos_token_id=2)


def _reference_zero_shot(clip_dir, classnames, templates):
    """One text at a time, unpadded, through the whole CLIPModel: the papers' recipe."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    rows = []
    with torch.no_grad():
        for name in classnames:
            feats = []
            for template in templates:
                text = template.replace("{c}", "{}").format(name)
                out = model.get_text_features(**tokenizer([text], return_tensors="pt"))
                feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
            stacked = torch.cat(feats).double()
            stacked = stacked / stacked.norm(dim=1, keepdim=True)
            mean = stacked.mean(0)
            rows.append(mean / mean.norm())
        return torch.stack(rows) * model.logit_scale.double().exp(), model


@pytest.mark.parametrize("which", ["tiny_clip", "old_eos_clip"])
def test_zero_shot_head_matches_the_reference(which, request):
    clip_dir = request.getfixturevalue(which)
    head = zero_shot_head(clip_dir, CLASSES, TEMPLATES)
    reference, model = _reference_zero_shot(clip_dir, CLASSES, TEMPLATES)
    assert head.bias is None and head.normalize is True
    assert head.weight.dtype == torch.float32 and head.weight.shape == (4, 12)
    torch.testing.assert_close(head.weight.double(), reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((4,), 100.0), atol=1e-3,
                               rtol=0)
    # Rows really differ per class, so the comparison above is not vacuous.
    assert torch.cdist(head.weight, head.weight).triu(1).sum() > 1
    assert model.config.projection_dim == head.dim


@pytest.mark.parametrize("which", ["tiny_clip", "old_eos_clip"])
def test_zero_shot_head_does_not_depend_on_batching(which, request):
    clip_dir = request.getfixturevalue(which)
    together = zero_shot_head(clip_dir, CLASSES, TEMPLATES)
    one_by_one = torch.cat([zero_shot_head(clip_dir, [c], TEMPLATES).weight for c in CLASSES])
    tiny_batches = zero_shot_head(clip_dir, CLASSES, TEMPLATES, batch_size=2).weight
    torch.testing.assert_close(together.weight, one_by_one, rtol=0, atol=1e-6)
    torch.testing.assert_close(together.weight, tiny_batches, rtol=0, atol=1e-6)


def test_zero_shot_head_errors(tmp_path, tiny_clip):
    from transformers import CLIPVisionModelWithProjection

    no_tokenizer = make_tiny_clip_dir(tmp_path / "no_tok", tokenizer=False)
    with pytest.raises(InputError, match=r"no_tok: no tokenizer files"):
        zero_shot_head(no_tokenizer, CLASSES, TEMPLATES)

    vision_only = tmp_path / "vision"
    config = tiny_clip_config()
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(str(vision_only))
    write_tokenizer_files(vision_only)
    with pytest.raises(InputError, match=r"vision: no text tower .*'clip_vision_model'"):
        zero_shot_head(str(vision_only), CLASSES, TEMPLATES)

    with pytest.raises(InputError, match=r"nowhere: no such directory"):
        zero_shot_head(str(tmp_path / "nowhere"), CLASSES, TEMPLATES)
    with pytest.raises(InputError, match=r"template 'a photo' has no '\{\}' or '\{c\}'"):
        zero_shot_head(tiny_clip, CLASSES, ["a photo of a {}.", "a photo"])
    with pytest.raises(InputError, match=r"at least one class name"):
        zero_shot_head(tiny_clip, [], TEMPLATES)

    # A CLIP directory whose checkpoint lost its text tower weights.
    from safetensors.torch import load_file
    stripped = Path(make_tiny_clip_dir(tmp_path / "stripped"))
    tensors = load_file(str(stripped / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_model.encoder")},
              str(stripped / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"stripped: the checkpoint lacks text-tower weights"):
        zero_shot_head(str(stripped), CLASSES, TEMPLATES)
