"""The media half of `StudioApi` (studio.api): LoRAs (trained saves, uploads), generation requests,
the gallery and the machine's GPUs, authorised per user. A mixin: it uses the API's `ctx`,
`own_job` and `_owner_filter`."""
from __future__ import annotations

import base64
import binascii
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.numbers import named_whole_number
from engine.paths import safe_name, user_folder
from engine.rundir import RunDir
from studio.auth import AccessDenied, User

log = logging.getLogger(__name__)

IMAGE_REFERENCES = ("image:", "gallery:")  # an upload of the user's; the start image of a gallery item of theirs
MAX_IMAGE_MB = 20  # a start image sent as text (HTTP API, MCP); base64 makes it a third larger on the wire
# Kinds told by their first bytes, not by a name the sender chose.
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def image_suffix(data: bytes) -> str:
    """'.png', '.jpg' or '.webp' for the bytes of such an image; refuses any other kind."""
    for magic, suffix in _IMAGE_MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    raise ValueError("a start image must be a png, jpg or webp image (base64 or a data URL)")


def decode_image_data(text: str) -> bytes:
    """The bytes of a start image given as base64 or a data URL ('data:image/png;base64,...')."""
    payload = text.strip()
    if payload.startswith("data:"):
        head, _, payload = payload.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("a start image data URL must be base64 ('data:image/png;base64,...')")
    if len(payload) * 3 / 4 > MAX_IMAGE_MB * 2**20:  # before decoding it
        raise ValueError(f"a start image must be at most {MAX_IMAGE_MB} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a start image must be a png, jpg or webp image (base64 or a data URL)") from None
    image_suffix(data)
    return data


def run_loras(run_dir: str | Path | None) -> list[tuple[str, Path]]:
    """Saved LoRAs of a run as (label, file), oldest first by the step each was saved at."""
    return [(save.label, save.file) for save in RunDir(run_dir).loras()] if run_dir else []


def without_paths(value: Any) -> Any:
    """Drop "path" keys: gradio_client takes any dict with one for a file to download."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class MediaApi:
    # ---- LoRAs ---------------------------------------------------------------------------------
    def user_uploads(self, user: User) -> Path:
        return self.ctx.layout.uploads_dir / user_folder(user.name)

    def user_images(self, owner: str) -> Path:
        """Where a user's start images are kept (by name: a request's status knows only its owner's)."""
        return self.ctx.layout.uploads_dir / user_folder(owner) / "images"

    def lora_choices(self, user: User, limit: int = 100) -> list[tuple[str, str]]:
        """(label, reference) of the LoRAs this user may stack: own trained saves and own uploads."""
        choices: list[tuple[str, str]] = []
        jobs = self.ctx.scheduler.list_jobs(owner=self._owner_filter(user), limit=limit)
        for job in jobs:
            if job.kind != "train":
                continue
            for label, _ in reversed(run_loras(job.run_dir)):
                choices.append((f"#{job.id} {job.name} · {label}", f"job:{job.id}/{label}"))
        uploads = self.user_uploads(user) / "loras"
        if uploads.is_dir():
            for file in sorted(uploads.glob("*.safetensors")):
                choices.append((f"uploaded · {file.name}", f"upload:{file.name}"))
        return choices

    def lora_file(self, user: User, reference: str) -> Path:
        """The file behind 'job:ID/epochN', 'job:ID' (newest save) or 'upload:NAME', if the user may use it."""
        reference = str(reference).strip()
        if reference.startswith("job:"):
            job_part, _, label = reference[4:].partition("/")
            saves = dict(self.job_lora_files(user, job_part))
            if not saves:
                raise FileNotFoundError(f"{reference}: job {job_part} has no saved LoRA yet")
            if not label:
                return list(saves.values())[-1]
            if label not in saves:
                raise FileNotFoundError(f"{reference}: no save {label!r} (has {', '.join(saves)})")
            return saves[label]
        if reference.startswith("upload:"):
            file = self.user_uploads(user) / "loras" / safe_name(reference[7:], "lora.safetensors")
            if not file.is_file():
                raise FileNotFoundError(f"{reference}: no such uploaded LoRA")
            return file
        raise ValueError(f"LoRA {reference!r}: use 'job:ID/epochN' or 'upload:NAME'")

    def lora_reference(self, user: User, path: str) -> str | None:
        """The stack reference ('job:ID/epochN' or 'upload:NAME') of a LoRA file, if the user may use it."""
        target = Path(path).resolve() if path else None
        for _, reference in self.lora_choices(user, limit=500):
            try:
                if target is not None and self.lora_file(user, reference).resolve() == target:
                    return reference
            except (FileNotFoundError, AccessDenied, ValueError):
                continue
        return None

    def upload_lora(self, user: User, file: str | Path) -> str:
        src = Path(file)
        if src.suffix.lower() != ".safetensors":
            raise ValueError(f"{src.name}: a LoRA must be a .safetensors file")
        target_dir = self.user_uploads(user) / "loras"
        target_dir.mkdir(parents=True, exist_ok=True)
        name = safe_name(src.stem, "lora") + ".safetensors"
        shutil.copyfile(src, target_dir / name)
        return f"upload:{name}"

    def upload_image(self, user: User, file: str | Path) -> str:
        """Keep a start image (image-to-video) among the user's uploads; returns its 'image:NAME' reference."""
        from engine.trainer.cache import file_hash

        src = Path(file)
        if src.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            raise ValueError(f"{src.name}: a start image must be a png, jpg, webp or bmp file")
        target_dir = self.user_images(user.name)
        if src.parent.resolve() == target_dir.resolve():  # already one of theirs (a gallery item's named upload)
            return f"image:{src.name}"
        target_dir.mkdir(parents=True, exist_ok=True)
        name = f"{safe_name(src.stem, 'image')}-{file_hash(src)[:10]}{src.suffix.lower()}"  # kept as generated from
        shutil.copyfile(src, target_dir / name)
        return f"image:{name}"

    def upload_image_data(self, user: User, text: str, name: str = "image") -> str:
        """Keep a start image sent as base64 or a data URL (HTTP API, MCP) among the user's uploads,
        as `upload_image` keeps a file; returns its 'image:NAME' reference."""
        data = decode_image_data(text)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / (safe_name(Path(name).stem, "image") + image_suffix(data))
            file.write_bytes(data)
            return self.upload_image(user, file)

    def image_reference(self, user: User, image: str | None) -> str | None:
        """A start image as a request takes it: an 'image:NAME' or 'gallery:ID' reference as given, base64
        or a data URL stored as the user's upload first (MCP)."""
        if not image or str(image).startswith(IMAGE_REFERENCES):
            return image or None
        return self.upload_image_data(user, image)

    def start_image(self, user: User, reference: str) -> Path:
        """The file of an 'image:NAME' upload of this user, or the start image a gallery item of theirs was
        made from ('gallery:ID', kept among their uploads again so a queued request does not depend on the
        item); never another path on the server."""
        if str(reference).startswith("gallery:"):
            image = self.own_item(user, str(reference)[8:]).start_image
            if image is None:
                raise FileNotFoundError(f"{reference}: that video was made without a start image, or it is gone")
            reference = self.upload_image(user, image)
        if not str(reference).startswith("image:"):
            raise ValueError(f"image {reference!r}: upload the start image first and give its 'image:NAME' "
                             "(or 'gallery:ID' of a video made from one)")
        file = self.user_images(user.name) / safe_name(str(reference)[6:], "image.png")
        if not file.is_file():
            raise FileNotFoundError(f"{reference}: no such uploaded image")
        return file

    # ---- inference -----------------------------------------------------------------------------
    def generate(self, user: User, request: dict[str, Any]) -> dict[str, Any]:
        from engine.inference.request import InferRequest

        values = dict(request)
        loras = values.pop("loras", None) or []
        specs = [{"path": str(self.lora_file(user, item["lora"])), "weight": item.get("weight", 1.0)}
                 for item in loras if str(item.get("lora", "")).strip()]
        if values.get("seed") in ("", -1):
            values["seed"] = None
        if values.get("image"):
            values["image"] = str(self.start_image(user, values["image"]))
        req = InferRequest.from_dict({**values, "loras": specs}).validate()
        request_id = self.ctx.inference.submit(req, owner=user.name)
        log.info("user %s submitted generation %s", user.name, request_id)
        # said at once, not only on the next status call: the service decided it when it queued the request
        return {"request_id": request_id, "warning": self.ctx.inference.status(request_id).get("warning")}

    def _own_request(self, user: User, request_id: str) -> dict[str, Any]:
        try:
            status = dict(self.ctx.inference.status(str(request_id)))
        except (KeyError, ValueError):
            raise AccessDenied(f"generation {request_id} not found") from None
        # the owner is part of the durable record: the check holds after a restart too
        self.ctx.accounts.check_owner(user, status.get("owner"), f"generation {request_id}")
        return status

    def _generation_view(self, status: dict[str, Any]) -> dict[str, Any]:
        view = {**status, "error": self.redact(status.get("error"))}
        image = (status.get("request") or {}).get("image")
        if image:  # no server path: an upload by the 'image:NAME' /generate takes again, else the file's name
            uploads = self.user_images(str(status.get("owner")))
            named = f"image:{Path(image).name}" if Path(image).parent == uploads else Path(image).name
            view["request"] = {**status["request"], "image": named}
        return without_paths(view)

    def generation_status(self, user: User, request_id: str) -> dict[str, Any]:
        return self._generation_view(self._own_request(user, request_id))

    def list_generations(self, user: User, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Generation requests visible to the user (all of them for an admin), newest first."""
        found = self.ctx.inference.list(owner=self._owner_filter(user), limit=min(named_whole_number("limit", limit, 1), 500),
                                        offset=named_whole_number("offset", offset, 0))
        return [self._generation_view(status) for status in found]

    def cancel_generation(self, user: User, request_id: str) -> dict[str, Any]:
        self._own_request(user, request_id)
        self.ctx.inference.cancel(request_id)
        return self.generation_status(user, request_id)

    # ---- gallery -------------------------------------------------------------------------------
    def gallery_list(self, user: User, query: str = "", model: str = "", lora: str = "",
                     favorite: bool = False, page: int = 1, page_size: int = 24,
                     all_users: bool = True) -> dict[str, Any]:
        items, total = self.ctx.gallery.list(owner=self._owner_filter(user, all_users), query=query or None,
                                             model=model or None, lora=lora or None,
                                             favorite=True if favorite else None,
                                             page=named_whole_number("page", page, 1),
                                             page_size=min(named_whole_number("page_size", page_size, 1), 200))
        return {"items": [self.item_dict(i) for i in items], "total": total, "page": page}

    def own_item(self, user: User, item_id: str):
        try:
            item = self.ctx.gallery.get(item_id)
        except (LookupError, ValueError):
            item = None
        if item is None:
            raise AccessDenied(f"gallery item {item_id} not found")
        self.ctx.accounts.check_owner(user, item.owner, f"gallery item {item_id}")
        return item

    @staticmethod
    def item_dict(item: Any) -> dict[str, Any]:
        """JSON of a gallery item without server paths (LoRAs are named, not located; a start image is
        'gallery:ID', which /generate takes to make the video again from it)."""
        data = asdict(item)
        data.pop("dir", None)
        if data["params"].get("image"):
            data["params"]["image"] = f"gallery:{item.id}"
        return without_paths(data)

    def gallery_item(self, user: User, item_id: str) -> dict[str, Any]:
        return self.item_dict(self.own_item(user, item_id))

    def gallery_favorite(self, user: User, item_id: str, value: bool) -> dict[str, Any]:
        self.own_item(user, item_id)
        self.ctx.gallery.set_favorite(item_id, bool(value))
        return self.gallery_item(user, item_id)

    def gallery_delete(self, user: User, item_id: str) -> dict[str, Any]:
        self.own_item(user, item_id)
        self.ctx.gallery.delete(item_id)
        return {"deleted": item_id}

    # ---- machine -------------------------------------------------------------------------------
    def gpu_status(self, user: User) -> dict[str, Any]:
        """The machine status with other users' jobs shown only as 'in use' (admins see them)."""
        status = self.ctx.machine_status()

        def shown(job: str, owner: str | None) -> str:  # owner None: an inference worker, nobody's job
            return job if owner is None or user.can_access(owner) else "in use (another user)"

        for gpu in status["gpus"]:
            if gpu["job"]:
                gpu["job"] = shown(gpu["job"], gpu["job_owner"])
            gpu.pop("job_owner", None)
        status["cpu_jobs"] = [f"{h['slot']}: {shown(h['job'], h['owner'])}" for h in status["cpu_jobs"]]
        for slot in status["cpu_slots"]:
            slot["job"] = shown(slot["job"], slot.pop("owner")) if slot["job"] else ""
        return status
