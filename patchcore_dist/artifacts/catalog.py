"""The model catalogue: which model version is current for each product of a ``--models`` folder.

    <models>/catalog.json                  the catalogue (below)
    <models>/<product>/<version>/          one committed model per fit, as ``fit --model`` writes it;
                                           <version> = v<UTC time>-<random>, sorting by fit time

    {"format_version": 1,
     "products": {"<product>": {"model": "<model URI>", "digest": "<model digest>", "version": "<version>",
                                "fitted": "<ISO time>", "images": <training images>, "threshold": <float|null>,
                                "promotion": {...} (when a fit with --validation decided it),
                                "previous": [<older entries, newest first, without their own "previous">],
                                "refused": {...} (the last new version that was not promoted)}}}

Guarantees: the catalogue is only ever replaced whole (readers see the old or the new one), and every
change is a read-modify-write by compare-and-swap (:func:`update_catalog`): the first one creates it
with :func:`storage.create_exclusive`, later ones replace it with :func:`storage.replace_if_tag`
(S3 ``If-Match``; locally a claim file and an atomic replace) on exactly the content they read. A
writer whose swap fails (another changed it in between) reads again and re-applies its change, so of
two fits updating different products at once neither entry is lost. Model folders are never changed:
a refit writes a new version beside the old, and rollback only edits the catalogue.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import random
import re
import time
import uuid
from typing import Callable

from ..errors import JobError
from . import storage

CATALOG = "catalog.json"
FORMAT_VERSION = 1
KEEP_PREVIOUS = 10   # older versions an entry keeps for rollback
_TRIES = 64          # compare-and-swap attempts before giving up (about a minute of backing off)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_product(name: str) -> str:
    """A product name as used for a folder and a catalogue key; a JobError for anything else."""
    if not _NAME.match(name):
        raise JobError(f"product name {name!r} is not usable: letters, digits, '.', '_', '-' only, not starting "
                       "with '.', '_' or '-', at most 128 characters")
    return name


def new_version() -> str:
    """A new version folder name: sorts by fit time, unique between concurrent fits."""
    return "v" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def empty() -> dict:
    return {"format_version": FORMAT_VERSION, "products": {}}


def parse(uri: str, data: bytes) -> dict:
    """A catalogue's bytes, checked; a JobError naming the file when it is not one."""
    try:
        cat = json.loads(data)
    except ValueError as e:
        raise JobError(f"{uri} is not a catalogue (not JSON: {e}); move it away or restore it") from None
    if not isinstance(cat, dict) or not isinstance(cat.get("products"), dict):
        raise JobError(f"{uri} is not a catalogue (no 'products' object); move it away or restore it")
    if cat.get("format_version") != FORMAT_VERSION:
        raise JobError(f"{uri} has format_version {cat.get('format_version')!r}; this version reads "
                       f"{FORMAT_VERSION}: use the patchcore-dist that wrote it")
    return cat


def read_catalog(models: str, opts: dict) -> dict:
    """The catalogue of ``models`` (an empty one when there is none yet)."""
    uri = storage.join(models, CATALOG)
    try:
        return parse(uri, storage.read_tagged(uri, **opts)[0])
    except FileNotFoundError:
        return empty()


def update_catalog(models: str, change: Callable[[dict], dict], opts: dict) -> dict:
    """Apply ``change`` (catalogue -> new catalogue; called again on a fresh copy after a lost race, so
    it must only depend on its argument) by compare-and-swap; returns the catalogue written."""
    uri = storage.join(models, CATALOG)
    for attempt in range(_TRIES):
        if attempt:
            _back_off(attempt)
        try:
            data, tag = storage.read_tagged(uri, **opts)
            current = parse(uri, data)
        except FileNotFoundError:
            tag, current = None, empty()
        new = change(copy.deepcopy(current))
        body = json.dumps(new, indent=1, sort_keys=True).encode()
        if tag is None:
            try:
                storage.create_exclusive(uri, body, **opts)
                return new
            except FileExistsError:
                continue
        elif storage.replace_if_tag(uri, tag, body, **opts):
            return new
    raise JobError(f"{uri} kept changing under this job ({_TRIES} tries): other jobs are updating it; run again "
                   f"(a leftover .{CATALOG}.cas-* claim next to it, of a killed job, blocks updates: delete it)")


def _back_off(attempt: int) -> None:
    """Wait before another try: a lost swap means another writer is between its claim and its replace
    (an fsync); retrying at once only finds its claim again. Growing, jittered, at most ~1 s a try."""
    time.sleep(min(0.01 * 1.5 ** attempt, 1.0) * random.uniform(0.5, 1.5))


def entry(model_uri: str, version: str, manifest: dict) -> dict:
    """A catalogue entry for a committed model (its manifest)."""
    return {"model": model_uri, "digest": manifest["model_digest"], "version": version,
            "fitted": manifest.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "images": manifest["training"]["used"], "threshold": manifest["stats"].get("threshold")}


def _bare(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("previous", "refused")}


def promote(product: str, new: dict) -> Callable[[dict], dict]:
    """The change that makes ``new`` the product's current entry; the current one moves to ``previous``."""
    def change(cat: dict) -> dict:
        old = cat["products"].get(product)
        prev = ([_bare(old)] + old.get("previous", [])) if old else []
        cat["products"][product] = {**new, "previous": prev[:KEEP_PREVIOUS]}
        return cat
    return change


def refuse(product: str, candidate: dict) -> Callable[[dict], dict]:
    """The change that records a version that was fitted but not promoted (the current entry stays)."""
    def change(cat: dict) -> dict:
        if product in cat["products"]:
            cat["products"][product]["refused"] = candidate
        return cat
    return change


def rollback(product: str) -> Callable[[dict], dict]:
    """The change that makes the product's previous version current again (the rolled-back one is
    dropped from the entry; its folder stays)."""
    def change(cat: dict) -> dict:
        cur = cat["products"].get(product)
        if cur is None:
            raise JobError(f"no product {product!r} in the catalogue (it lists: {', '.join(sorted(cat['products']))})")
        if not cur.get("previous"):
            raise JobError(f"{product}: no previous version to roll back to (current {cur['version']})")
        back, *rest = cur["previous"]
        cat["products"][product] = {**back, "rolled_back_from": _bare(cur), "previous": rest}
        return cat
    return change


def current_models(models: str, opts: dict) -> dict[str, dict]:
    """product -> its current entry."""
    return read_catalog(models, opts)["products"]
