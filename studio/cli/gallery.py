"""`python -m studio gallery list|show|delete|favorite|export`: generated videos from a terminal."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from studio.settings import StudioSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gallery", help="list, show, delete, favorite or export generated videos")
    sub = parser.add_subparsers(dest="gallery_command", required=True)
    listing = sub.add_parser("list", help="newest first")
    listing.add_argument("--owner", help="only this user's videos")
    listing.add_argument("--query", help="text in the prompt")
    listing.add_argument("--model", help="text in the model name or path")
    listing.add_argument("--lora", help="text in a LoRA's name or path")
    listing.add_argument("--favorites", action="store_true", help="only favorites")
    listing.add_argument("--page", type=int, default=1, help="which page of results")
    listing.add_argument("--page-size", type=int, default=24, help="videos per page")
    listing.add_argument("--json", action="store_true", help="print the page as JSON")
    listing.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="every setting, the seed, timings and files of one video")
    show.add_argument("id", help="the video's gallery id (gallery list shows them)")
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    show.set_defaults(func=cmd_show)
    delete = sub.add_parser("delete", help="delete videos (record and files)")
    delete.add_argument("ids", nargs="+", help="gallery ids")
    delete.set_defaults(func=cmd_delete)
    favorite = sub.add_parser("favorite", help="mark (or with --off unmark) a favorite")
    favorite.add_argument("id", help="a gallery id")
    favorite.add_argument("--off", action="store_true", help="unmark instead")
    favorite.set_defaults(func=cmd_favorite)
    export = sub.add_parser("export", help="zip videos (video, poster, sidecar) under exports/")
    export.add_argument("ids", nargs="+", help="gallery ids")
    export.set_defaults(func=cmd_export)


def _open(settings: StudioSettings):
    from studio.services import open_services

    return open_services(settings).gallery


def _errors(func):
    def run(args: argparse.Namespace, settings: StudioSettings) -> int:
        from engine.gallery import GalleryError

        try:
            return func(_open(settings), args)
        except (GalleryError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _loras(item) -> str:
    return ", ".join(f"{lora['name']}:{lora['weight']:g}" for lora in item.loras) or "-"


@_errors
def cmd_list(gallery, args: argparse.Namespace) -> int:
    items, total = gallery.list(owner=args.owner, query=args.query, model=args.model, lora=args.lora,
                                favorite=True if args.favorites else None, page=args.page, page_size=args.page_size)
    if args.json:
        print(json.dumps({"total": total, "page": args.page,
                          "items": [{**item.to_meta(), "favorite": item.favorite, "dir": str(item.dir)}
                                    for item in items]}, default=str))
        return 0
    print(f"{total} video(s); page {args.page}")
    for item in items:
        when = datetime.fromtimestamp(item.created_at).strftime("%Y-%m-%d %H:%M")
        star = "*" if item.favorite else " "
        print(f"{star} {item.id}  {when}  {item.owner:<10} {item.width}x{item.height}x{item.num_frames}  "
              f"seed {item.seed}  loras {_loras(item)}  {item.prompt[:60]!r}")
    return 0


@_errors
def cmd_show(gallery, args: argparse.Namespace) -> int:
    item = gallery.get(args.id)
    image = item.start_image
    data = {**item.to_meta(), "favorite": item.favorite, "video": str(item.video_path),
            "poster": str(item.poster_path), "sidecar": str(item.meta_path),
            "start_image": str(image) if image else None}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    params = item.params
    print(f"id        {item.id}{'  (favorite)' if item.favorite else ''}")
    print(f"owner     {item.owner}   created {datetime.fromtimestamp(item.created_at):%Y-%m-%d %H:%M:%S}")
    print(f"model     {item.model}")
    print(f"loras     {_loras(item)}")
    print(f"prompt    {item.prompt}")
    print(f"negative  {item.negative_prompt}")
    print(f"size      {item.width}x{item.height}, {item.num_frames} frames at {item.fps} fps")
    print(f"sampling  seed {item.seed}, {params.get('steps')} steps, guidance {params.get('guidance_scale')}, "
          f"flow shift {params.get('flow_shift')}{', fused' if params.get('fuse_loras') else ''}")
    print("timings   " + ", ".join(f"{k} {v:.2f}s" for k, v in item.timings.items()))
    print(f"video     {item.video_path}")
    if image:  # `infer --image` with it makes the video again
        print(f"start     {image}")
    elif params.get("image"):
        print("start     (made from a start image that is no longer kept)")
    return 0


@_errors
def cmd_delete(gallery, args: argparse.Namespace) -> int:
    for item_id in args.ids:
        gallery.delete(item_id)
        print(f"deleted {item_id}")
    return 0


@_errors
def cmd_favorite(gallery, args: argparse.Namespace) -> int:
    item = gallery.set_favorite(args.id, not args.off)
    print(f"{item.id} {'is' if item.favorite else 'is no longer'} a favorite")
    return 0


@_errors
def cmd_export(gallery, args: argparse.Namespace) -> int:
    print(gallery.export_zip(args.ids))
    return 0
