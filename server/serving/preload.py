"""What --preload-adapters names: adapter folders, folders of them, or s3:// and hf:// URIs of
one adapter each."""

from __future__ import annotations

import logging

from adapters import sources

logger = logging.getLogger(__name__)


def preload_targets(roots: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, uri) of each adapter the roots name, in order; a root that cannot be read is
    logged and skipped, not fatal."""
    targets = []
    for root in roots:
        try:
            kind = sources.scheme(root)
        except Exception as exc:
            logger.error("not preloading %s: %s", root, exc)
            continue
        if kind != "file":
            targets.append((sources.adapter_name_for(root), root))
            continue
        path = sources.local_path(root)
        try:
            dirs = (
                [path]
                if (path / "adapter_config.json").is_file()
                else sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
            )
        except OSError as exc:
            logger.error("not preloading adapters from %s: %s", path, exc)
            continue
        targets.extend((d.name, str(d)) for d in dirs)
    return targets
