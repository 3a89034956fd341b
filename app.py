"""Entry point: `python app.py` serves the studio (also how a Hugging Face Space runs it)."""
from __future__ import annotations

import argparse
import logging
import sys

from studio.settings import SettingsError, add_settings_arguments, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Video LoRA Studio")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from studio.serve import serve

    return serve(settings)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
