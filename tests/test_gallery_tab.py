"""The Gallery tab's handlers without a browser: pages, the detail view, favorite, delete and
"reuse in Infer", on a real studio context and gallery items with real files."""
from __future__ import annotations

from pathlib import Path

import pytest

from studio.api import StudioApi
from studio.auth import User
from tabs import gallery as tab
from tests.gallery_support import add

ALICE, BOB = User("alice"), User("bob")


def test_pages_show_posters_and_only_change_when_the_items_do(api: StudioApi) -> None:
    first = add(api.ctx.gallery, "a", prompt="a purple star", seed=1)
    add(api.ctx.gallery, "b", prompt="a red circle", seed=2)
    add(api.ctx.gallery, "c", owner="bob", prompt="bob's square", seed=3)
    page = tab.gallery_page(api, ALICE, "", "", "", False, True, 1)
    assert len(page.ids) == 2 and page.info == "page 1 of 1 · 2 videos"
    assert all(Path(file).name == "poster.png" and Path(file).is_file() for file, _ in page.media)
    assert tab.gallery_page(api, ALICE, "purple", "", "", False, True, 1).ids == [first.id]
    again = tab.gallery_page(api, ALICE, "", "", "", False, True, 1)
    assert again.signature == page.signature  # nothing changed: the grid is not redrawn
    assert tab.toggle_favorite(api, ALICE, first.id) is True
    assert tab.gallery_page(api, ALICE, "", "", "", False, True, 1).signature != page.signature
    assert tab.gallery_page(api, ALICE, "", "", "", True, True, 1).ids == [first.id]


def test_view_reuse_and_delete_one_item(api: StudioApi) -> None:
    item = add(api.ctx.gallery, "a", seed=7, loras=[{"path": "/gone/lora.safetensors", "name": "old", "weight": 0.5}])
    video, table, star = tab.item_view(api, ALICE, item.id)
    assert Path(video).is_file() and "seed" in table and star == "☆ Favorite"
    with pytest.raises(Exception, match="not found"):
        tab.item_view(api, BOB, item.id)
    reused = tab.reuse_values(api, ALICE, item.id, ["prompt", "width", "seed", "flow_shift"])
    assert reused.values == ["a purple star", 48, 7, 3.0] and reused.loras == []
    assert reused.missing == [item.loras[0]["name"]]  # its file is gone: reported, not stacked
    assert reused.start_image is None  # text-to-video: the form's start image is cleared
    with pytest.raises(ValueError, match="select a video"):
        tab.delete_item(api, ALICE, None)
    assert f"deleted {item.id}" in tab.delete_item(api, ALICE, item.id)
    assert tab.gallery_page(api, ALICE, "", "", "", False, True, 1).ids == []


def test_reuse_brings_the_start_image_back_after_its_upload_is_deleted(api: StudioApi, tmp_path: Path) -> None:
    """The Infer form's image input gets a link to the item's own copy; /generate takes 'gallery:ID'."""
    from tests.family_support import start_image

    upload = api.start_image(ALICE, api.upload_image(ALICE, start_image(tmp_path / "start.png")))
    item = add(api.ctx.gallery, "i2v", image=str(upload))
    upload.unlink()
    reused = tab.reuse_values(api, ALICE, item.id, ["prompt"])
    link = Path(reused.start_image)
    assert link.parent.parent == api.ctx.layout.served_dir and link.read_bytes() == item.start_image.read_bytes()
    assert api.gallery_item(ALICE, item.id)["params"]["image"] == f"gallery:{item.id}"  # no server path
    again = api.start_image(ALICE, f"gallery:{item.id}")  # what /generate does with it: one of alice's uploads
    assert again.parent == api.user_uploads(ALICE) / "images" and again.read_bytes() == link.read_bytes()
    with pytest.raises(Exception, match="not found"):
        api.start_image(BOB, f"gallery:{item.id}")
    with pytest.raises(FileNotFoundError, match="without a start image"):
        api.start_image(ALICE, f"gallery:{add(api.ctx.gallery, 't2v').id}")


def test_captions_lead_with_the_lora_mix() -> None:
    item = {"prompt": "a purple star " * 10, "favorite": True, "loras": [{"name": "demo", "weight": 0.0}]}
    assert tab._caption(item).startswith("★ [0× demo] a purple star")
    assert tab._caption({"prompt": "plain", "loras": []}) == "plain"
