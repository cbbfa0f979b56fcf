"""Loading and saving image-tokenizer weights without running foreign code.

Three layouts are read:

* our folder: ``model.pt`` (``{"format", "config", "state_dict"}``, plain containers, loaded with
  ``torch.load(weights_only=True)``) + ``config.json`` + ``manifest.json``;
* a taming-transformers Lightning ``.ckpt``: weights under ``state_dict`` next to pickled callback,
  optimizer and ``omegaconf`` objects. It is read by :class:`RestrictedUnpickler`, which resolves
  only an allow-list of globals (``collections.OrderedDict`` and torch's tensor rebuild
  functions); every other global becomes an inert placeholder class that is never imported and
  whose "calls" only record their arguments, so a ``__reduce__`` payload cannot execute;
* a Hugging Face Chameleon VQ-VAE folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``): encoder, quantizer and quant convs, no decoder.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_cm3leon.tokenizer.vqgan import VQGAN, VQGANConfig

FORMAT = "lit_cm3leon.vqgan/1"
IGNORED_TAMING_PREFIXES = ("loss.", "discriminator.", "perceptual_loss.")


class CheckpointError(ValueError):
    """A file or folder is not a checkpoint layout we can read; the message names what was expected."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling of torch zip checkpoints
# --------------------------------------------------------------------------------------------
class Inert:
    """Stand-in for a global outside the allow-list. Never imported, never executed.

    Instances record what the pickle tried to do with them (``args`` of the call, ``state``
    passed to ``__setstate__``) so a caller can inspect, but nothing runs.
    """

    _module = "?"
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "state", None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a placeholder dict subclass
        if self.state is None or not isinstance(self.state, dict):
            object.__setattr__(self, "state", {})
        self.state[key] = value

    def append(self, value: Any) -> None:  # APPENDS on a placeholder list subclass
        object.__setattr__(self, "state", (self.state or []) + [value])

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<inert {self._module}.{self._name}>"


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(
            f"Inert[{module}.{name}]", (Inert,), {"_module": module, "_name": name}
        )
    return _PLACEHOLDERS[key]


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(f"refusing tensor subclass {new_type!r} in checkpoint")
    ret = func(*args)
    if type(ret) is not new_type:
        ret = ret.as_subclass(new_type)
    return ret


def _rebuild_parameter(data, requires_grad, backward_hooks, *extra):
    return torch.nn.Parameter(data, requires_grad)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    **{("torch", n): _StorageType(d) for n, d in _STORAGE_DTYPES.items()},
}
ALLOWED_GLOBALS.update(
    {("torch", str(d).removeprefix("torch.")): d for d in _STORAGE_DTYPES.values()}
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler over a torch zip archive that imports nothing outside :data:`ALLOWED_GLOBALS`."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.placeholders: set[str] = set()
        self._storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        self.placeholders.add(f"{module}.{name}")
        return placeholder(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r} in checkpoint")
        _, storage_type, key, _location, _numel = pid
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise CheckpointError(f"storage of unknown type {storage_type!r} in checkpoint")
        if key not in self._storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            untyped = (
                torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
                if raw
                else torch.UntypedStorage(0)
            )
            self._storages[key] = torch.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True
            )
        return self._storages[key]


def restricted_load(path: str | Path) -> tuple[Any, set[str]]:
    """Unpickle a torch zip checkpoint without importing or calling anything outside the allow-list.

    Returns the object and the names of the globals that were replaced by inert placeholders.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (torch>=1.6 format); legacy pickle-stream "
            "checkpoints are refused because they cannot be read without trusting them. Re-save "
            "the state dict with a recent torch: torch.save({'state_dict': sd}, 'file.ckpt')"
        )
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkls:
            raise CheckpointError(
                f"{path}: zip archive without '<name>/data.pkl'; not a torch checkpoint"
            )
        prefix = pkls[0][: -len("data.pkl")]
        unpickler = RestrictedUnpickler(zf.read(pkls[0]), zf, prefix)
        obj = unpickler.load()
    return obj, unpickler.placeholders


# --------------------------------------------------------------------------------------------
# taming .ckpt
# --------------------------------------------------------------------------------------------
def infer_config(sd: dict[str, torch.Tensor], resolution: int = 256) -> VQGANConfig:
    """Architecture from weight shapes (resolution is not in the weights; attention levels are)."""
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted(
            {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
        )
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        n_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        attn_res = [resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
        has_decoder = "decoder.conv_out.weight" in sd
        return VQGANConfig(
            resolution=resolution,
            in_channels=int(in_channels),
            out_ch=int(sd["decoder.conv_out.weight"].shape[0]) if has_decoder else 3,
            ch=int(ch),
            ch_mult=tuple(ch_mult),
            num_res_blocks=n_blocks,
            attn_resolutions=tuple(attn_res),
            z_channels=int(sd["encoder.conv_out.weight"].shape[0]),
            n_embed=int(sd["quantize.embedding.weight"].shape[0]),
            embed_dim=int(sd["quantize.embedding.weight"].shape[1]),
            mid_attn="encoder.mid.attn_1.q.weight" in sd,
            legacy=True,
            has_decoder=has_decoder,
        )
    except KeyError as e:
        raise CheckpointError(
            f"cannot infer the VQGAN architecture: weight {e} missing (not a taming VQModel?)"
        ) from e


def _taming_yaml_config(ckpt: Path) -> VQGANConfig | None:
    """taming's ``model.params`` from a yaml beside the checkpoint (or in ``../configs/``)."""
    import yaml

    candidates = [
        ckpt.with_suffix(".yaml"),
        *sorted(ckpt.parent.glob("*.yaml")),
        *sorted((ckpt.parent.parent / "configs").glob("*project.yaml")),
    ]
    for c in candidates:
        if not c.is_file():
            continue
        doc = yaml.safe_load(c.read_text()) or {}
        params = (doc.get("model") or {}).get("params") or {}
        dd = params.get("ddconfig")
        if not dd:
            continue
        return VQGANConfig(
            resolution=dd["resolution"],
            in_channels=dd.get("in_channels", 3),
            out_ch=dd.get("out_ch", 3),
            ch=dd["ch"],
            ch_mult=tuple(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=tuple(dd.get("attn_resolutions", ())),
            z_channels=dd["z_channels"],
            n_embed=params["n_embed"],
            embed_dim=params["embed_dim"],
            dropout=dd.get("dropout", 0.0),
            double_z=dd.get("double_z", False),
            legacy=True,
        )
    return None


def load_taming(path: str | Path, resolution: int | None = None) -> tuple[VQGAN, dict]:
    """A taming ``VQModel`` Lightning checkpoint -> (model, info)."""
    path = Path(path)
    obj, placeholders = restricted_load(path)
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(
            f"{path}: no 'state_dict' dict at the top level (taming .ckpt layout expected)"
        )
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_TAMING_PREFIXES)}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    cfg = _taming_yaml_config(path)
    source = "yaml"
    if cfg is None:
        cfg, source = infer_config(sd, resolution or 256), "inferred from weight shapes"
    elif resolution:
        cfg.resolution = resolution
    model = VQGAN(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the {source} config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), {
        "source": "taming",
        "config_from": source,
        "placeholders": sorted(placeholders),
    }


# --------------------------------------------------------------------------------------------
# Hugging Face Chameleon VQ-VAE folder
# --------------------------------------------------------------------------------------------
CHAMELEON_PREFIXES = ("model.vqmodel.", "vqmodel.")


def chameleon_config(cfg: dict) -> VQGANConfig:
    """``ChameleonVQVAEConfig`` (or a ``ChameleonConfig`` holding one as ``vq_config``) -> ours."""
    if cfg.get("model_type") == "chameleon":
        cfg = cfg.get("vq_config") or {}
    if cfg.get("double_latent"):
        raise CheckpointError(
            "Chameleon config with double_latent=True is not a VQ layout we support"
        )
    vanilla = cfg.get("attn_type", "vanilla") == "vanilla"
    return VQGANConfig(
        resolution=cfg.get("resolution", 512),
        in_channels=cfg.get("in_channels", 3),
        ch=cfg.get("base_channels", 128),
        ch_mult=tuple(cfg.get("channel_multiplier", (1, 1, 2, 2, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2),
        attn_resolutions=tuple(cfg.get("attn_resolutions") or ()) if vanilla else (),
        z_channels=cfg.get("latent_channels", 256),
        n_embed=cfg.get("num_embeddings", 8192),
        embed_dim=cfg.get("embed_dim", 256),
        mid_attn=vanilla,
        legacy=True,
        has_decoder=False,
    )


def chameleon_key(key: str) -> str | None:
    """HF key -> our key (None: not part of the tokenizer). The module tree is the same as taming's."""
    for p in CHAMELEON_PREFIXES:
        if key.startswith(p):
            key = key[len(p) :]
            break
    if key.startswith(("encoder.", "quantize.embedding.", "quant_conv.", "post_quant_conv.")):
        return key
    return None


def load_chameleon(folder: str | Path) -> tuple[VQGAN, dict]:
    folder = Path(folder)
    cfg = chameleon_config(json.loads((folder / "config.json").read_text()))
    weights: dict[str, torch.Tensor] = {}
    st = sorted(folder.glob("*.safetensors"))
    if st:
        from safetensors.torch import load_file

        for f in st:
            weights.update(load_file(str(f)))
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(
            f"{folder}: no model.safetensors or pytorch_model.bin beside config.json"
        )
    sd = {nk: v for k, v in weights.items() if (nk := chameleon_key(k)) is not None}
    model = VQGAN(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: Chameleon weights do not fit its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), {"source": "chameleon"}


# --------------------------------------------------------------------------------------------
# our own folder
# --------------------------------------------------------------------------------------------
def state_hash(model: VQGAN) -> str:
    """Content hash of the weights and config (stable across save/load)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_folder(model: VQGAN, out_dir: str | Path, manifest: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    # plain layout even when trained in channels_last
    sd = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }
    meta = json.loads(json.dumps(manifest or {}, default=str))  # plain containers only
    torch.save({"format": FORMAT, "config": cfg, "state_dict": sd, "meta": meta}, out / "model.pt")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    man = {
        "format": FORMAT,
        "hash": state_hash(model),
        "h": model.config.latent_size,
        "w": model.config.latent_size,
        "n_codes": model.config.n_embed,
        "resolution": model.config.resolution,
        **(manifest or {}),
    }
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return out


def load_ours(path: str | Path) -> tuple[VQGAN, dict]:
    path = Path(path)
    f = path / "model.pt" if path.is_dir() else path
    obj = torch.load(f, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise CheckpointError(
            f"{f}: not a {FORMAT} checkpoint (expected keys format/config/state_dict)"
        )
    model = VQGAN(VQGANConfig.from_dict(obj["config"]))
    model.load_state_dict(obj["state_dict"])
    info: dict = {
        "source": "lit_cm3leon",
        **obj.get("meta", {}),
    }  # preset, metrics (the training run's)
    man = f.parent / "manifest.json"  # may have been rewritten by the fit entry point: kept as is
    if man.is_file():
        info["manifest"] = json.loads(man.read_text())
    return model.eval(), info


def load_any(path: str | Path, resolution: int | None = None) -> tuple[VQGAN, dict]:
    """Dispatch on layout; the error names every layout we accept."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.pt").is_file():
            return load_ours(p)
        if (p / "config.json").is_file() and (
            any(p.glob("*.safetensors")) or (p / "pytorch_model.bin").is_file()
        ):
            return load_chameleon(p)
    elif p.is_file():
        if zipfile.is_zipfile(p):
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
                if isinstance(obj, dict) and obj.get("format") == FORMAT:
                    return load_ours(p)
            except pickle.UnpicklingError:
                pass  # foreign globals inside: a Lightning checkpoint, read it restricted
        return load_taming(p, resolution)
    raise CheckpointError(
        f"{p}: not an image tokenizer. Expected one of: a lit_cm3leon folder (model.pt + config.json "
        "+ manifest.json), a taming-transformers .ckpt file (weights under 'state_dict'), a Hugging Face "
        "Chameleon VQ-VAE folder (config.json + model.safetensors or pytorch_model.bin), or a preset name"
    )
