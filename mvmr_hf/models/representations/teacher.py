"""A frozen `transformers` vision model as a representation: the teacher of knowledge distillation.

The paper distils a teacher by maximising ``dCor(z̃, r(x))`` between the student's embedding of the
augmented view and the teacher's output for the non-augmented view (section 5.2; it is one term of
eq. 9). Here the teacher is any `transformers` vision model, by Hub id or local folder::

    teacher = load_teacher("openai/clip-vit-base-patch16")   # or a folder written by save_pretrained
    r = teacher(images01)                                     # (B, 512) float32, no grad

**Input.** ``images01`` is the batch of non-augmented views, ``(B, 3, H, W)`` in ``[0, 1]``, on any
device. The teacher prepares it on that device as its *own* image processor prepares the 8-bit images
users have (:mod:`~mvmr_hf.models.representations.preprocessing`).

**Output** (always ``(B, D)`` float32, ``output=`` picks it):

========== =====================================================================================
kind       value
========== =====================================================================================
embedding  the image embedding of an image-text model: CLIP's projected ``image_embeds``; SigLIP's
           pooled output (its attention-pooling head *is* its embedding)
pooler     the model's ``pooler_output`` (ViT: dense + tanh on CLS; DINOv2: the layer-normed CLS;
           ConvNeXt: global average pool + LayerNorm; CLIP: the post-LayerNorm CLS, before projection;
           timm: the pooled pre-logits features of ``forward_head``, what timm calls the embedding)
cls        ``last_hidden_state[:, 0]``, the CLS token as the model returns it (for CLIP that is
           before ``post_layernorm``); an error for models without a CLS token (SigLIP, ConvNeXt,
           timm CNNs and timm ViTs built without ``cls_token``)
mean       the mean of ``last_hidden_state`` over the patch tokens, without CLS, distillation and
           register tokens (timm: its ``num_prefix_tokens``); for convolutional models the spatial
           mean of the last feature map
tokens     ``last_hidden_state`` flattened: all tokens (prefix tokens included) of a transformer,
           the whole last feature map of a convolutional model (channels first; timm models with
           channels-last maps, e.g. Swin, are brought to ``(B, C, H, W)``)
========== =====================================================================================

``auto`` resolves, in order, to ``embedding`` for image-text models (CLIP, MetaCLIP 2, SigLIP), to
``pooler`` when the model returns one *and its weights were in the checkpoint* (a pooler that
``from_pretrained`` had to initialise randomly, e.g. ViT loaded from a ``ViTForImageClassification``
checkpoint, is never used; asking for it explicitly is an error), else to ``cls`` when the model has a
CLS token, else to ``mean``. So DINOv2, ConvNeXt and timm models give ``pooler``, classification ViTs
give ``cls``.

Image-text checkpoints load only their image tower (``CLIPVisionModelWithProjection``,
``SiglipVisionModel``); other vision models load with ``AutoModel`` (``TimmWrapperModel`` for timm
folders, without classifier). The model is frozen, kept in eval mode and run under
``torch.no_grad()`` (not ``inference_mode``: its outputs enter autograd graphs as constants).
``trust_remote_code`` is passed on only when the caller sets it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES

from mvmr_hf.errors import ConfigError
from mvmr_hf.models.representations.preprocessing import (
    Preprocessing,
    _quiet_transformers,
    _read_preprocessing,
)
from mvmr_hf.utils import is_local_path

OUTPUT_KINDS = ("auto", "embedding", "pooler", "cls", "mean", "tokens")

# Image-text models: the class that holds only the image tower (with its projection, if any).
IMAGE_TOWERS = {
    "clip": "CLIPVisionModelWithProjection",
    "metaclip_2": "MetaClip2VisionModelWithProjection",
    "siglip": "SiglipVisionModel",
}


class Teacher(nn.Module):
    """A frozen vision model that maps ``[0, 1]`` images to ``(B, D)`` float32 features (see module doc).

    Build it with :func:`load_teacher`. ``tower`` is the vision model, ``projection`` the linear map
    to an image-text embedding space (CLIP) or ``None``, ``settings`` its :data:`Preprocessing`
    (:class:`PreprocessSettings` or :class:`TimmTransform`). Follows the representation protocol of
    ``docs/architecture.md``: ``name``, ``deterministic``, ``gather`` and :meth:`fingerprint`.

    Args:
        tower: the vision model, frozen and kept in eval mode.
        projection: the linear map from the tower's pooled output to the image-text embedding space
            (CLIP's ``visual_projection``); None for a vision-only model.
        settings: the model's own preprocessing of ``[0, 1]`` images into ``pixel_values``.
        output: the resolved kind of output (``embedding``, ``pooler``, ``cls``, ``mean`` or
            ``tokens``, not ``auto``); ``tokens`` is too wide to gather (``gather`` false).
        prefix_tokens: the tokens before the patch tokens (CLS, distillation, registers), left out
            of ``mean`` over a token sequence.
        model_name_or_path: the Hub id or folder it was loaded from, part of :meth:`fingerprint`.
        source: what identifies the weights' version (a Hub commit, or a digest of a local folder's
            files), part of :meth:`fingerprint`.
    """

    name = "teacher"
    deterministic = True

    def __init__(
        self,
        tower: PreTrainedModel,
        projection: nn.Module | None,
        settings: Preprocessing,
        *,
        output: str,
        prefix_tokens: int,
        model_name_or_path: str,
        source: dict,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection
        self.settings = settings
        self.output = output
        self.prefix_tokens = prefix_tokens
        self.model_name_or_path = model_name_or_path
        # A token grid is wide: the objective then uses the local batch (docs/architecture.md).
        self.gather = output != "tokens"
        self._source = source
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode (dropout off, fixed statistics) whatever ``mode`` says."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model weights are stored in (the output is always float32)."""
        return next(self.tower.parameters()).dtype

    def preprocess(self, images01: Tensor) -> Tensor:
        """The model's ``pixel_values`` for a ``(B, 3, H, W)`` batch in ``[0, 1]`` (see the module doc)."""
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ConfigError(
                f"the teacher takes float images of shape (B, 3, H, W) in [0, 1], got a {images01.dtype} "
                f"tensor of shape {tuple(images01.shape)}: convert the batch first"
            )
        return self.settings(images01).to(self.dtype)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """The ``(B, D)`` float32 output of kind :attr:`output` for already-preprocessed ``pixel_values``."""
        out = _run(self.tower, self.projection, pixel_values)
        if self.output in ("embedding", "pooler"):
            features = out[self.output]
        elif self.output == "cls":
            features = out["hidden"][:, 0]
        elif self.output == "mean":
            hidden = out["hidden"]
            features = (
                hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, self.prefix_tokens :].mean(1)
            )
        else:
            features = out["hidden"]
        return features.flatten(1).float()

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        """``(B, D)`` float32 teacher features of a ``(B, 3, H, W)`` batch in ``[0, 1]``, on its device."""
        return self.encode(self.preprocess(images01))

    def fingerprint(self) -> dict:
        """What the output depends on, for the exact cache: model, weights version, kind, preprocessing."""
        return {
            "model": self.model_name_or_path,
            **self._source,
            "output": self.output,
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": self.settings.describe(),
        }


def load_teacher(
    name_or_path: str,
    *,
    output: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """Load a frozen teacher from a Hub model id or a local folder (see the module docstring).

    Args:
        name_or_path: a Hub id (``"openai/clip-vit-base-patch16"``) or a folder written by
            ``save_pretrained`` (``config.json`` + weights, ideally with the image-processor config).
        output: ``auto``, ``embedding``, ``pooler``, ``cls``, ``mean`` or ``tokens``.
        revision: Hub branch, tag or commit; ``None`` is the default branch.
        token: Hub token for gated or private models (``True``: the saved login).
        trust_remote_code: allow a model that ships its own code (off unless asked).
        dtype: dtype to hold the weights in (e.g. ``torch.bfloat16``); the output is float32.

    Raises:
        ConfigError: a missing folder, an unknown or unreachable Hub id, a model that is not a vision
            model, an image processor whose preprocessing the teacher does not reproduce exactly, or
            an ``output`` the model cannot give.
    """
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"teacher output {output!r} is not known: use one of {', '.join(OUTPUT_KINDS)}")
    folder = _local_folder(name_or_path)
    location = str(folder) if folder is not None else name_or_path
    hub = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    with loading_errors(name_or_path):
        config = AutoConfig.from_pretrained(location, **hub)
    tower_class, tower_config = _tower_class(name_or_path, config, trust_remote_code)
    with loading_errors(name_or_path), _quiet_transformers():
        model, info = tower_class.from_pretrained(
            location, config=tower_config, dtype=dtype, output_loading_info=True, **hub
        )
    pooler_loaded = _check_loaded(name_or_path, info["missing_keys"])
    projection = getattr(model, "visual_projection", None)
    tower = model.vision_model if projection is not None else model
    settings = _read_preprocessing(name_or_path, location, config, hub)
    with torch.no_grad():
        probe = _run(tower, projection, settings(torch.full((1, 3, 224, 224), 0.5)).to(model.dtype))
    prefix_tokens, has_cls = _token_layout(model)
    resolved = _resolve_output(
        output,
        probe,
        name=name_or_path,
        image_text=config.model_type in IMAGE_TOWERS or projection is not None,
        pooler_loaded=pooler_loaded,
        has_cls=has_cls,
    )
    return Teacher(
        tower,
        projection,
        settings,
        output=resolved,
        prefix_tokens=prefix_tokens,
        model_name_or_path=name_or_path,
        source=_local_digest(folder) if folder is not None else _hub_commit(name_or_path, revision),
    )


def _run(tower: nn.Module, projection: nn.Module | None, pixel_values: Tensor) -> dict[str, Tensor | None]:
    """The raw outputs: ``embedding`` (projected pooler), ``pooler`` and ``hidden`` (last hidden state).

    ``hidden`` is ``(B, N, C)`` tokens or a ``(B, C, H, W)`` map: the feature maps of timm models that
    work channels-last (Swin, MambaOut, ...) are permuted, so that spatial means and maps are right.
    """
    out = tower(pixel_values=pixel_values)
    pooler = out.pooler_output
    embedding = pooler if projection is None or pooler is None else projection(pooler)
    hidden = out.last_hidden_state
    if hidden.ndim == 4 and getattr(getattr(tower, "timm_model", None), "output_fmt", None) == "NHWC":
        hidden = hidden.permute(0, 3, 1, 2)
    return {"embedding": embedding, "pooler": pooler, "hidden": hidden}


def _local_folder(name_or_path: str) -> Path | None:
    """The model folder ``name_or_path`` names, ``None`` for a Hub id; raise for a bad path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"teacher folder {name_or_path!r} has no config.json: pass a folder written by "
                "save_pretrained (config.json and weights) or a Hub model id"
            )
        return path
    if path.exists():
        raise ConfigError(f"teacher {name_or_path!r} is a file: pass the folder that holds config.json")
    if is_local_path(name_or_path):
        raise ConfigError(
            f"teacher folder {name_or_path!r} does not exist: check the path, or pass a Hub model id"
        )
    return None


@contextmanager
def loading_errors(name: str, *, what: str = "teacher") -> Iterator[None]:
    """Turn the errors of loading ``name`` into one-line :class:`ConfigError` messages naming it.

    Serves every loader that takes a local folder or a Hub id: ``from_pretrained`` here, and timm's
    pretrained weights of an evaluated ``--model`` (:func:`mvmr_hf.evaluation.features.load_encoder`), whose
    download fails with the same Hub errors. ``what`` names the argument in the message.
    """
    try:
        yield
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(_explain(error, name, what)) from error


def _explain(error: BaseException, name: str, what: str) -> str:
    """One sentence for a loading error, from the Hub error types anywhere in its cause chain."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__

    def found(kind: type[BaseException]) -> bool:
        return any(isinstance(e, kind) for e in chain)

    if found(HFValidationError):
        return (
            f"{what} {name!r} is neither a local folder nor a valid Hub model id: check the name or the path"
        )
    if found(GatedRepoError):
        return (
            f"{what} {name!r} is a gated Hub model you have no access to: accept its terms on "
            "huggingface.co and log in (`hf auth login`, or pass token=...), or pass a local folder"
        )
    if found(RevisionNotFoundError):
        return f"the requested revision of {what} {name!r} does not exist on the Hub: check the revision"
    if found(RepositoryNotFoundError):
        return (
            f"{what} {name!r} is neither a local folder nor a model on the Hub (or it is private): check "
            "the name, log in with `hf auth login` for private models, or pass a local folder"
        )
    if found(LocalEntryNotFoundError) or found(ConnectionError):
        return (
            f"could not download {what} {name!r} from the Hugging Face Hub (offline or no network): pass a "
            "local folder that holds the model, or connect and log in (`hf auth login`) if it is gated"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not load {what} {name!r}: {first_line}"


def _tower_class(
    name: str, config: PretrainedConfig, trust_remote_code: bool
) -> tuple[type, PretrainedConfig]:
    """The class that loads the image tower of ``config``'s model, and the config to give it."""
    model_type = config.model_type
    if model_type in IMAGE_TOWERS:
        tower_config = copy.deepcopy(config.vision_config)
        if hasattr(config, "projection_dim"):  # the vision sub-config does not always carry it
            tower_config.projection_dim = config.projection_dim
        return getattr(transformers, IMAGE_TOWERS[model_type]), tower_config
    with_projection = [a for a in config.architectures or [] if a.endswith("VisionModelWithProjection")]
    if with_projection and hasattr(transformers, with_projection[0]):
        return getattr(transformers, with_projection[0]), config
    if model_type == "timm_wrapper" and "num_classes" in (config.model_args or {}):
        # timm's save_for_hf records num_classes in model_args, but TimmWrapperModel passes
        # num_classes=0 itself (timm would get it twice); the classifier is not part of a teacher.
        config = copy.deepcopy(config)
        config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
    remote = trust_remote_code and "AutoModel" in (getattr(config, "auto_map", None) or {})
    if model_type in MODEL_FOR_IMAGE_MAPPING_NAMES or model_type.endswith("_vision_model") or remote:
        return AutoModel, config
    raise ConfigError(
        f"teacher {name!r} is a {model_type!r} model, not a vision model: pass a transformers image model "
        "(e.g. CLIP, SigLIP, DINOv2, ViT, ConvNeXt)"
    )


def _check_loaded(name: str, missing_keys: set[str]) -> bool:
    """Whether the pooler's weights were loaded; raise when any other weight is missing (random)."""
    pooler_keys = {key for key in missing_keys if "pooler." in key}
    others = sorted(missing_keys - pooler_keys)
    if others:
        raise ConfigError(
            f"{len(others)} weights of teacher {name!r} are not in its checkpoint (e.g. {others[0]!r}), so "
            "it would run partly random: pass a folder or id that holds the full model"
        )
    return not pooler_keys


def _token_layout(model: nn.Module) -> tuple[int, bool]:
    """How many tokens precede the patch tokens (CLS, distillation, registers), and whether one is CLS.

    timm counts them itself (``num_prefix_tokens``, CLS first when ``cls_token`` is set; a timm ViT
    may have registers without CLS). In `transformers` models they follow a CLS token (0 without).
    """
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return getattr(timm_model, "num_prefix_tokens", 0), getattr(timm_model, "cls_token", None) is not None
    for module in model.modules():
        if (
            getattr(module, "cls_token", None) is not None
            or getattr(module, "class_embedding", None) is not None
        ):
            registers = getattr(module, "register_tokens", None)
            distillation = getattr(module, "distillation_token", None) is not None
            return 1 + int(distillation) + (registers.shape[1] if registers is not None else 0), True
    return 0, False


def _resolve_output(
    requested: str,
    out: dict[str, Tensor | None],
    *,
    name: str,
    image_text: bool,
    pooler_loaded: bool,
    has_cls: bool,
) -> str:
    """The output kind ``requested`` resolves to, given the model's outputs ``out`` on a probe image."""
    has_embedding = image_text and out["embedding"] is not None
    has_pooler = out["pooler"] is not None and pooler_loaded
    tokens = out["hidden"].ndim == 3
    has_cls = tokens and has_cls
    if requested == "auto":
        if has_embedding:
            return "embedding"
        return "pooler" if has_pooler else ("cls" if has_cls else "mean")
    if requested == "embedding" and not has_embedding:
        raise ConfigError(
            f"teacher {name!r} gives no image-text embedding (only CLIP- and SigLIP-style models do): use "
            "output='pooler', 'cls', 'mean' or 'tokens' (or 'auto')"
        )
    if requested == "pooler" and not has_pooler:
        reason = (
            "its pooler weights are not in the checkpoint" if out["pooler"] is not None else "it has none"
        )
        raise ConfigError(
            f"teacher {name!r} gives no usable pooler output ({reason}): use output='cls' or 'mean'"
        )
    if requested == "cls" and not has_cls:
        kind = "has no CLS token" if tokens else "is convolutional (no tokens)"
        raise ConfigError(f"teacher {name!r} {kind}: use output='pooler', 'mean' or 'tokens'")
    return requested


def _local_digest(folder: Path) -> dict:
    """A digest of the folder's file names, sizes and modification times (cheap, changes with the weights)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.expanduser().rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(folder.expanduser())}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return {"files_sha256": digest.hexdigest()}


def _hub_commit(name: str, revision: str | None) -> dict:
    """The commit the cached ``config.json`` of a Hub model came from (its snapshot folder's name)."""
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return {"commit": Path(cached).parent.name if isinstance(cached, str) else revision}
