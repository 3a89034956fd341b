"""Gallery records + media folders: filters, pagination, favorites, delete, zip export, crash recovery."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from engine.gallery import Gallery, GalleryError, lora_display_name
from engine.paths import DataLayout
from tests.gallery_support import add
from engine.store.db import Database


@pytest.fixture
def gallery(studio_home: Path) -> Gallery:
    layout = DataLayout(studio_home).ensure()
    return Gallery(Database(layout.db_path), layout)


def test_add_moves_media_and_writes_sidecar(gallery: Gallery) -> None:
    item = add(gallery, "one", loras=[{"path": "/x/runs/7-cat/epoch3/adapter_model.safetensors", "weight": 0.8}])
    assert item.dir == gallery.root / "alice" / item.id and item.video_path.is_file() and item.poster_path.is_file()
    assert not (gallery.root / ".staging" / "one").exists()
    meta = json.loads(item.meta_path.read_text())
    assert meta["seed"] == 1 and meta["params"]["steps"] == 2 and meta["loras"][0]["name"] == "7-cat/epoch3"
    got = gallery.get(item.id)
    assert got.loras == item.loras and got.timings == {"denoise_s": 1.5} and got.digest == "d1"


def test_filters_and_pagination(gallery: Gallery) -> None:
    style = {"path": "/l/neon_style.safetensors", "weight": 1.0}
    add(gallery, "a", prompt="A red Circle bounces", seed=1)
    add(gallery, "b", owner="bob", prompt="a blue square", loras=[style], seed=2)
    add(gallery, "c", prompt="100% red_ball", model="/models/wan-1.3b", loras=[style], seed=3)
    assert gallery.list()[1] == 3
    assert {i.seed for i in gallery.list(query="red")[0]} == {1, 3}
    assert [i.seed for i in gallery.list(query="100%")[0]] == [3]  # LIKE wildcards are literal
    assert [i.seed for i in gallery.list(query="red_circle")[0]] == []  # "_" is no wildcard
    assert [i.seed for i in gallery.list(owner="bob")[0]] == [2]
    assert [i.seed for i in gallery.list(model="wan-1.3b")[0]] == [3]
    assert {i.seed for i in gallery.list(lora="neon")[0]} == {2, 3}
    assert [i.seed for i in gallery.list(lora="neon", owner="alice")[0]] == [3]
    page1, total = gallery.list(page=1, page_size=2)
    page2, _ = gallery.list(page=2, page_size=2)
    assert total == 3 and [i.seed for i in page1] == [3, 2] and [i.seed for i in page2] == [1]  # newest first
    with pytest.raises(ValueError):
        gallery.list(page=0)


def test_favorite_and_delete_with_files(gallery: Gallery) -> None:
    keep, gone = add(gallery, "keep", seed=1), add(gallery, "gone", seed=2)
    assert gallery.set_favorite(keep.id, True).favorite
    assert [i.id for i in gallery.list(favorite=True)[0]] == [keep.id]
    assert [i.id for i in gallery.list(favorite=False)[0]] == [gone.id]
    gallery.delete(gone.id)
    assert not gone.dir.exists() and gallery.list()[1] == 1
    with pytest.raises(GalleryError, match=gone.id):
        gallery.get(gone.id)
    with pytest.raises(GalleryError):
        gallery.delete(gone.id)
    with pytest.raises(GalleryError):
        gallery.set_favorite("nope", True)


def test_export_zip_of_a_selection(gallery: Gallery) -> None:
    first, second, _ = add(gallery, "1", seed=1), add(gallery, "2", seed=2), add(gallery, "3", seed=3)
    path = gallery.export_zip([first.id, second.id])
    assert path.parent == gallery.layout.exports_dir and path.suffix == ".zip"
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        assert names == {f"{i}/{f}" for i in (first.id, second.id) for f in ("video.mp4", "poster.png", "meta.json")}
        assert archive.read(f"{first.id}/video.mp4") == first.video_path.read_bytes()
    with pytest.raises(GalleryError):
        gallery.export_zip([])
    with pytest.raises(GalleryError):
        gallery.export_zip(["missing"])


def test_folder_without_record_is_recovered_on_start(gallery: Gallery) -> None:
    item = add(gallery, "crash", prompt="survives a crash", seed=9)
    gallery.records.delete(item.id)  # as if the app died between moving the files and committing
    assert gallery.list()[1] == 0
    reopened = Gallery(Database(gallery.layout.db_path), gallery.layout)
    items, total = reopened.list(query="survives")
    assert total == 1 and items[0].id == item.id and items[0].seed == 9 and items[0].loras == []


def test_lora_display_names() -> None:
    assert lora_display_name("/r/runs/3-cats/epoch4/adapter_model.safetensors") == "3-cats/epoch4"
    assert lora_display_name("/loras/neon.safetensors") == "neon"
    assert lora_display_name("/r/runs/3-cats/epoch4") == "3-cats/epoch4"


def test_each_users_items_in_their_folder_and_an_old_layout_item_still_works(gallery: Gallery) -> None:
    alice, bob = add(gallery, "a", owner="alice", seed=1), add(gallery, "b", owner="bob", seed=2)
    assert (alice.dir.parent, bob.dir.parent) == (gallery.root / "alice", gallery.root / "bob")
    old = add(gallery, "old", owner="alice", seed=3)
    old.dir.replace(gallery.root / old.id)  # where items lived before per-user folders
    listed = {item.id: item for item in gallery.list()[0]}
    assert listed[old.id].dir == gallery.root / old.id and listed[old.id].display_path.is_file()
    assert gallery.get(old.id).poster_path.is_file() and gallery.get(alice.id).dir == alice.dir
    with zipfile.ZipFile(gallery.export_zip([old.id])) as archive:
        assert f"{old.id}/video.mp4" in archive.namelist()
    gallery.records.delete(old.id), gallery.records.delete(bob.id)  # a crash: one folder of each layout
    reopened = Gallery(Database(gallery.layout.db_path), gallery.layout)
    assert reopened.list()[1] == 3
    assert (reopened.get(old.id).dir, reopened.get(bob.id).dir) == (gallery.root / old.id, bob.dir)
    reopened.delete(old.id)
    assert not (gallery.root / old.id).exists() and reopened.list()[1] == 2
    with pytest.raises(GalleryError, match="not found"):  # a user's folder is no item
        reopened.delete("alice")
    assert alice.dir.is_dir()


def test_an_image_to_video_item_keeps_its_start_image(gallery: Gallery, tmp_path: Path) -> None:
    """A copy beside the video (the upload may be deleted), exported with it, gone with the item."""
    from tests.family_support import start_image

    upload = start_image(tmp_path / "start-0a1b.jpg")  # the copy keeps its kind (suffix)
    item = add(gallery, "i2v", image=str(upload))
    assert item.start_image == item.dir / "start_image.jpg" and item.start_image.read_bytes() == upload.read_bytes()
    upload.unlink()
    assert gallery.get(item.id).start_image.read_bytes() == item.start_image.read_bytes()
    with zipfile.ZipFile(gallery.export_zip([item.id])) as archive:
        assert archive.read(f"{item.id}/start_image.jpg") == item.start_image.read_bytes()
    assert add(gallery, "t2v").start_image is None  # text-to-video: none
    older = add(gallery, "older", image=str(start_image(tmp_path / "older.png")))
    (older.dir / "start_image.png").unlink()  # made before copies were kept: the request's own file
    assert gallery.get(older.id).start_image == tmp_path / "older.png"
    gallery.delete(item.id)
    assert not item.dir.exists()
