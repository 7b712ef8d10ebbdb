"""DeiT checkpoints: the eight published configurations as facts, and loading one into PyTorch.

Loading lives in `runtime/` (not `export/`) because the torch backends rebuild the model an artifact
names. Offline, a published name can be built with synthetic (random) weights of the exact
architecture: valid for export, latency and numerics, never a classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.artifact import ArtifactMeta
from runtime.errors import HUB_UNREACHABLE, ModelError
from runtime.labels import IMAGENET_1K
from runtime.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch

SYNTHETIC_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class CheckpointError(ModelError):
    """A checkpoint that cannot be loaded; the message says which and why, in one line."""


class HubUnreachable(CheckpointError):
    """The Hub could not be reached and nothing was cached (callers may offer synthetic weights)."""

    exit_code = HUB_UNREACHABLE


@dataclass(frozen=True)
class PublishedDeiT:
    """One published `facebook/deit-*` checkpoint: architecture and preprocessing.

    The non-distilled checkpoints are stored on the Hub as `model_type: vit` (one CLS token, loaded by
    `ViTForImageClassification`); the distilled ones as `model_type: deit` with a distillation token.
    """

    model_type: str  # "deit" (distilled, two heads) or "vit"
    hidden_size: int
    num_heads: int
    image_size: int
    preprocessing: Preprocessing
    top1: float  # published ImageNet top-1 (facebookresearch/deit README)
    num_layers: int = 12

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size


def _legacy(size: int) -> Preprocessing:
    # ViTFeatureExtractor-style configs: square resize to the input size, no crop, mean/std 0.5.
    return Preprocessing(size, size, None, None, resample=2, mean=HALF, std=HALF)


def _distilled(resize: int, crop: int) -> Preprocessing:
    return Preprocessing(resize, resize, crop, crop, resample=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)


PUBLISHED: dict[str, PublishedDeiT] = {
    "facebook/deit-tiny-patch16-224": PublishedDeiT("vit", 192, 3, 224, _legacy(224), 72.2),
    "facebook/deit-small-patch16-224": PublishedDeiT("vit", 384, 6, 224, _legacy(224), 79.9),
    "facebook/deit-base-patch16-224": PublishedDeiT("vit", 768, 12, 224, _legacy(224), 81.8),
    "facebook/deit-base-patch16-384": PublishedDeiT("vit", 768, 12, 384, _legacy(384), 82.9),
    "facebook/deit-tiny-distilled-patch16-224": PublishedDeiT("deit", 192, 3, 224, _distilled(256, 224), 74.5),
    "facebook/deit-small-distilled-patch16-224": PublishedDeiT("deit", 384, 6, 224, _distilled(256, 224), 81.2),
    "facebook/deit-base-distilled-patch16-224": PublishedDeiT("deit", 768, 12, 224, _distilled(256, 224), 83.4),
    "facebook/deit-base-distilled-patch16-384": PublishedDeiT("deit", 768, 12, 384, _distilled(438, 384), 85.2),
}


def published_config(name: str) -> Any:
    """The exact `transformers` config of a published checkpoint, without the network."""
    from transformers import DeiTConfig, ViTConfig

    spec = PUBLISHED[name]
    common = dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        image_size=spec.image_size,
        patch_size=16,
        num_labels=1000,
        layer_norm_eps=1e-12,
    )
    if spec.model_type == "deit":
        return DeiTConfig(architectures=["DeiTForImageClassificationWithTeacher"], **common)
    return ViTConfig(architectures=["ViTForImageClassification"], **common)


@dataclass
class LoadedCheckpoint:
    """A PyTorch model in eval mode and the artifact metadata describing it (fp32, before export)."""

    model: torch.nn.Module
    meta: ArtifactMeta
    warnings: list[str] = field(default_factory=list)  # one line each, for the user (e.g. preprocessing disagreements)


def load_checkpoint(
    source: str,
    weights: str = "pretrained",
    task: str = "classification",
    attn_implementation: str = "sdpa",
) -> LoadedCheckpoint:
    """Load a DeiT checkpoint (hub id or local `save_pretrained` folder) in eval mode.

    Raises CheckpointError with a one-line reason for unknown names, non-DeiT configs, missing
    folders, unreachable hubs and corrupt weights.
    """
    config, arch, local = _config(source, weights, task)
    model = _build_model(source, config, arch, weights, attn_implementation)
    preprocessing, pre_source, warnings = checkpoint_preprocessing(source, local, config, weights)
    id2label = _id2label(config) if task == "classification" else None
    outputs = (
        ["embedding"]
        if task == "features"
        else ["logits", "cls_logits", "distillation_logits"]
        if arch.endswith("WithTeacher")
        else ["logits"]
    )
    meta = ArtifactMeta(
        checkpoint=str(local) if local is not None else source,
        weights=weights,
        architecture=arch,
        task=task,
        num_layers=int(config.num_hidden_layers),
        image_size=int(config.image_size),
        preprocessing=preprocessing,
        preprocessing_source=pre_source,
        id2label=id2label,
        output_names=outputs,
        config=config.to_dict(),
    )
    return LoadedCheckpoint(model, meta, warnings)


def _load_config(source: str, local: Path | None, weights: str) -> Any:
    from transformers import AutoConfig

    if local is None and weights == "synthetic":
        if source not in PUBLISHED:
            known = ", ".join(sorted(PUBLISHED))
            raise CheckpointError(f"{source}: unknown checkpoint for synthetic weights; known: {known}")
        return published_config(source)
    try:
        return AutoConfig.from_pretrained(str(local) if local else source)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        if local is not None:
            raise CheckpointError(f"{local}: unreadable config.json ({_first_line(err)})") from None
        message = f"{source}: cannot load from the Hugging Face Hub ({_first_line(err)})"
        if _is_missing_repo(err):
            raise CheckpointError(message) from None
        hint = ("; pass --weights synthetic for a random-weights model of the same architecture" if source in PUBLISHED
                else "; check the network, or pass a local save_pretrained folder")
        raise HubUnreachable(message + hint) from None


def _config(source: str, weights: str, task: str) -> tuple[Any, str, Path | None]:
    """(transformers config, architecture, local folder or None for a hub id) of a DeiT checkpoint."""
    if weights not in ("pretrained", "synthetic"):
        raise CheckpointError(f"--weights must be 'pretrained' or 'synthetic', not {weights!r}")
    if task not in ("classification", "features"):
        raise CheckpointError(f"--task must be 'classification' or 'features', not {task!r}")
    local = Path(source).expanduser()
    is_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if is_local and not local.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint folder (expected a save_pretrained folder or a hub id)")
    config = _load_config(source, local if is_local else None, weights)
    model_type = getattr(config, "model_type", None)
    if model_type not in ("deit", "vit"):
        raise CheckpointError(f"{source}: not a DeiT checkpoint (model_type={model_type!r})")
    return config, _architecture(config, task), local if is_local else None


def parameter_count(source: str, weights: str = "pretrained", task: str = "classification") -> int:
    """The parameters of a checkpoint's model from its config alone: the model is built on torch's meta
    device (no memory, no weights read), so a caller can check for room before loading it."""
    import torch
    import transformers

    config, arch, _ = _config(source, weights, task)
    extra: dict[str, Any] = {"add_pooling_layer": False} if arch.endswith("Model") else {}
    with torch.device("meta"):
        model = getattr(transformers, arch)(config, **extra)
    return sum(p.numel() for p in model.parameters())


def _architecture(config: Any, task: str) -> str:
    prefix = "DeiT" if config.model_type == "deit" else "ViT"
    if task == "features":
        return f"{prefix}Model"
    archs = getattr(config, "architectures", None) or []
    if config.model_type == "deit" and any(a.endswith("WithTeacher") for a in archs):
        return "DeiTForImageClassificationWithTeacher"
    return f"{prefix}ForImageClassification"


def _build_model(source: str, config: Any, arch: str, weights: str, attn_implementation: str) -> torch.nn.Module:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our CLIs draw their own bars, on terminals only
    cls = getattr(transformers, arch)
    extra: dict[str, Any] = {"add_pooling_layer": False} if arch.endswith("Model") else {}
    if weights == "synthetic":
        config._attn_implementation = attn_implementation
        torch.manual_seed(SYNTHETIC_SEED)
        model = cls(config, **extra)
    else:
        try:
            model = cls.from_pretrained(source, attn_implementation=attn_implementation, **extra)
        except Exception as err:  # corrupt files raise safetensors/pickle/OS errors alike
            raise CheckpointError(f"{source}: cannot load weights ({_first_line(err)})") from None
    return model.eval()


def checkpoint_preprocessing(source: str, local: Path | None, config: Any,
                             weights: str = "pretrained") -> tuple[Preprocessing, str, list[str]]:
    """The checkpoint's own preprocessing (its `preprocessor_config.json`), where it came from, and warnings.

    A published id's table entry is the fallback when the Hub cannot give the file (and the source of
    synthetic weights, which never download anything); when both exist and disagree, the checkpoint's
    own file wins and one warning line names both values.
    """
    cfg_path: Path | None = None
    if local is not None:
        cfg_path = local / "preprocessor_config.json" if (local / "preprocessor_config.json").exists() else None
    elif weights != "synthetic" or source not in PUBLISHED:
        cfg_path = _hub_file(source, "preprocessor_config.json")
    table = PUBLISHED[source].preprocessing if source in PUBLISHED and local is None else None
    if cfg_path is not None:
        try:
            own = Preprocessing.from_hf_config(json.loads(cfg_path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{cfg_path}: bad preprocessor config ({_first_line(err)})") from None
        differ = [f"{f.name} {getattr(own, f.name)} (table {getattr(table, f.name)})" for f in fields(Preprocessing)
                  if table is not None and getattr(own, f.name) != getattr(table, f.name)]
        warnings = [f"{source}: its preprocessor_config.json differs from the built-in table: {'; '.join(differ)}; "
                    "using the checkpoint's own"] if differ else []
        return own, "preprocessor_config.json", warnings
    if table is not None:
        why = "synthetic weights" if weights == "synthetic" else "the Hub did not give preprocessor_config.json"
        return table, f"published table (runtime/checkpoints.py; {why})", []
    # The DeiT paper's eval transform: resize to size/0.875, centre crop, ImageNet mean/std.
    size = int(config.image_size)
    return _distilled(int(size / 0.875), size), "default DeiT eval transform (no preprocessor_config.json)", []


def _hub_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    except Exception:  # the hub's many error types all mean "not available": fall back
        return None


def _id2label(config: Any) -> list[str] | str | None:
    labels = getattr(config, "id2label", None) or {}
    names = [labels[i] for i in sorted(labels)]
    if len(names) == 1000 and all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return IMAGENET_1K  # a synthetic published config: the standard ImageNet-1k order
    return names or None


def _is_missing_repo(err: BaseException) -> bool:
    """The Hub answered that the repository or file does not exist (as opposed to: no answer)."""
    chain: BaseException | None = err
    while chain is not None:
        if type(chain).__name__ in ("RepositoryNotFoundError", "EntryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def model_outputs(model: Any, pixel_values: Any, output_names: list[str]) -> tuple[Any, ...]:
    """The tensors an export names, from a transformers DeiT/ViT model (the ONNX graph's outputs)."""
    if output_names == ["embedding"]:
        return (model(pixel_values=pixel_values).last_hidden_state[:, 0],)
    out = model(pixel_values=pixel_values)
    return tuple(getattr(out, name) for name in output_names)
