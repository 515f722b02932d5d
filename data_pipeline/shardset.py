"""What a `data.shards` spec names: the shard URLs, their sample counts, and the manifest if any.

Specs: a shard folder (with or without manifest.json), a manifest.json path or URL, a brace URL list
(`/d/x-{000000..000127}.tar`, `https://h/x-{0..9}.tar`, `s3://b/x-{..}.tar`, `pipe:cmd`; several
lists joined with `::`), an http(s) folder URL ending in `/`, or `sklearn:digits` (materialised once
into a local cache, so the embedded data goes through exactly the same reader as user data).

Opening a URL: local paths directly; `pipe:` and http(s) through `webdataset.gopen` (curl, with
retries; urllib when curl is missing); `s3://` and other fsspec schemes through fsspec when the
backend is installed, else `pipe:aws s3 cp` (webdataset has no s3 scheme of its own).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import braceexpand

from data_pipeline.errors import DataError
from data_pipeline.sources import DIGITS

MANIFEST = "manifest.json"
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
DIGITS_CACHE_VERSION = 1  # bump when the writer's pixel policy changes, so stale caches are rebuilt


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard, None when unknown (remote, no manifest)
    manifest: dict[str, Any] | None
    local_dir: Path | None  # folder holding the set (and its manifest) when local
    digests: tuple[str | None, ...] | None = None  # each shard's sha256 in the manifest, when it has them
    why_no_counts: str = ""  # when counts are None: why (e.g. the manifest beside remote shards: HTTP 404)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    @property
    def resolution(self) -> int | None:
        r = (self.manifest or {}).get("resolution")
        return int(r) if r else None


def is_remote(url: str) -> bool:
    if url.startswith("pipe:"):
        return True
    m = _SCHEME_RE.match(url)
    return bool(m) and m.group(1).lower() != "file"


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if url.startswith("file:"):
        return Path(url[5:])
    return Path(url)


def resolve(spec: str, *, resolution: int | None = None, count: bool = True) -> ShardSet:
    """Resolve a spec. `count=False` skips scanning local tars for counts when there is no manifest."""
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data spec: give a shard folder, a manifest.json, a brace URL list or sklearn:digits")
    if spec == DIGITS:
        return resolve(str(digits_shards(resolution or 8)))
    if not is_remote(spec) and "{" not in spec and "::" not in spec:
        p = _local_path(spec)
        if p.is_dir():
            if (p / MANIFEST).is_file():
                return _from_manifest(_read_json_local(p / MANIFEST), base=str(p), local_dir=p)
            tars = sorted(str(t) for t in p.glob("*.tar"))
            if not tars:
                raise DataError(f"shard folder {p} holds neither manifest.json nor any .tar shard")
            return ShardSet(tuple(tars), _scan_counts(tars) if count else None, None, p)
        if p.suffix == ".json":
            if not p.is_file():
                raise DataError(f"manifest not found: {p}")
            return _from_manifest(_read_json_local(p), base=str(p.parent), local_dir=p.parent)
    if is_remote(spec) and not spec.startswith("pipe:") and (spec.endswith(".json") or spec.endswith("/")):
        url = spec + MANIFEST if spec.endswith("/") else spec
        return _from_manifest(_read_json_remote(url), base=url.rsplit("/", 1)[0], local_dir=None)
    return _from_url_list(spec, count)


def load_manifest(spec: str, *, resolution: int | None = None) -> dict[str, Any] | None:
    """The manifest of a spec, or None when the shards have none (e.g. a bare brace list)."""
    return resolve(spec, resolution=resolution, count=False).manifest


def manifest_dir(spec: str, *, resolution: int | None = None) -> Path | None:
    """The local folder of a shard set (where FID reference statistics can be cached); None if remote."""
    return resolve(spec, resolution=resolution, count=False).local_dir


def _from_manifest(m: dict[str, Any], *, base: str, local_dir: Path | None) -> ShardSet:
    try:
        shards = m["shards"]
        urls = tuple(_join(base, str(s["url"])) for s in shards)
        counts = tuple(int(s["num_samples"]) for s in shards)
        digests = tuple(_digest(s) for s in shards)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"manifest in {base} lacks shards[].url / shards[].num_samples") from None
    if not urls:
        raise DataError(f"manifest in {base} lists no shards")
    return ShardSet(urls, counts, m, local_dir, digests)


def _digest(shard: dict[str, Any]) -> str | None:
    d = shard.get("sha256")
    return str(d) if d else None


def _join(base: str, url: str) -> str:
    if is_remote(url) or os.path.isabs(url):
        return url
    if is_remote(base):
        return base.rstrip("/") + "/" + url
    return str(Path(base) / url)


def _expand(spec: str) -> list[str]:
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise DataError(f"data spec {spec!r} expands to no URL")
    return urls


def _from_url_list(spec: str, count: bool) -> ShardSet:
    urls = _expand(spec)
    remote = [is_remote(u) for u in urls]
    if not any(remote):
        paths = [_local_path(u) for u in urls]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of {spec!r} not found, first: {missing[0]}")
        parents = {p.parent.resolve() for p in paths}
        local_dir = parents.pop() if len(parents) == 1 else None
        m, known, digests = _neighbour_manifest(local_dir, [p.name for p in paths]) if local_dir else (None,) * 3
        counts = known if known is not None else (_scan_counts([str(p) for p in paths]) if count else None)
        return ShardSet(tuple(str(p) for p in paths), counts, m, local_dir, digests)
    for scheme_first in {u.split(":", 1)[0]: u for u in urls}.values():
        opener(scheme_first)  # fail now, in the launcher, not later inside a DataLoader worker
    # Remote list: use a manifest.json beside the shards for their counts if one is there. A server or
    # bucket that cannot be reached at all fails here, with its cause; a manifest it does not hand out
    # (404, 403) leaves the counts unknown, and why, for whoever needs them.
    first = urls[0]
    if first.startswith("pipe:") or "/" not in first:
        return ShardSet(tuple(urls), None, None, None, why_no_counts="pipe: URLs have no manifest beside them")
    url = first.rsplit("/", 1)[0] + "/" + MANIFEST
    try:
        m = _read_json_remote(url)
    except _NoManifest as exc:
        return ShardSet(tuple(urls), None, None, None, why_no_counts=str(exc))
    names = [u.rsplit("/", 1)[-1] for u in urls]
    m, counts, digests = _listed(m, names, lambda u: u.rsplit("/", 1)[-1])
    why = "" if counts is not None else f"{url} does not list every shard of {spec!r}"
    return ShardSet(tuple(urls), counts, m, None, digests, why_no_counts=why)


Listed = tuple[dict[str, Any] | None, tuple[int, ...] | None, tuple[str | None, ...] | None]


def _listed(m: dict[str, Any], names: list[str], name_of: Callable[[str], str]) -> Listed:
    """(manifest, counts, digests) of the shards `names` if manifest `m` lists every one of them."""
    try:
        by_name = {name_of(str(s["url"])): (int(s["num_samples"]), _digest(s)) for s in m["shards"]}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, None, None
    if not all(n in by_name for n in names):
        return None, None, None
    return m, tuple(by_name[n][0] for n in names), tuple(by_name[n][1] for n in names)


def _neighbour_manifest(d: Path, names: list[str]) -> Listed:
    """The manifest in the shards' folder, their counts and digests, if it lists every one of them."""
    if not (d / MANIFEST).is_file():
        return None, None, None
    try:
        m = _read_json_local(d / MANIFEST)
    except DataError:
        return None, None, None
    return _listed(m, names, lambda u: Path(u).name)


def _read_json_local(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read manifest {p}: {exc}") from None


class _NoManifest(DataError):
    """The server answered, but has no manifest for us (not found, or not allowed)."""


def _read_json_remote(url: str) -> dict[str, Any]:
    try:
        with open_url(url) as f:
            data = f.read()
    except DataError:
        raise
    except Exception as exc:
        cause, answered = explain_open_error(url, exc)
        raise (_NoManifest if answered else DataError)(f"cannot read manifest {url}: {cause}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise DataError(f"manifest {url} is not JSON: {exc}") from None


def explain_open_error(url: str, exc: BaseException) -> tuple[str, bool]:
    """(the real cause of a failed read of `url` in a few words, whether the server answered 403/404).

    Why: the clients say it badly (curl through webdataset only gives its exit status inside a tuple of
    its arguments; boto wraps its causes), and a user needs to know whether to install a client, set
    credentials, start a server or fix a path. curl's failure is asked again with urllib, once, for the
    HTTP status or the socket error.
    """
    scheme = url.split(":", 1)[0].lower() if is_remote(url) else "file"
    if scheme in ("http", "https") and not isinstance(exc, urllib.error.URLError):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
                pass
        except Exception as probe:  # noqa: BLE001 - any answer is more telling than curl's status
            exc = probe
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}", exc.code in (401, 403, 404, 410)
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else OSError(str(exc.reason))
    name = type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and is this its host and port?)", False
    if name == "NoCredentialsError" or "Unable to locate credentials" in str(exc):
        return ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                "environment of every process", False)
    if isinstance(exc, FileNotFoundError):
        return "not found" + (" (404)" if scheme != "file" else ""), True
    if isinstance(exc, PermissionError):
        return ("access denied (403): check the credentials and the bucket policy" if scheme != "file"
                else "permission denied"), True
    if isinstance(exc, TimeoutError):
        return "timed out", False
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})", False
    status = re.search(r"exit (\d+) \(read\)", str(exc))  # webdataset's Pipe: ((args,), {...}): exit N (read)
    if status:
        code = int(status.group(1))
        if scheme == "pipe":
            return f"the command exited with status {code}", False
        return f"curl exited with status {code}{_CURL_EXITS.get(code, '')}", False
    text = " ".join(str(exc).split()) or "no detail"
    return f"{name}: {text[:300]}", False


_CURL_EXITS = {6: " (host not found)", 7: " (could not connect)", 22: " (HTTP error)", 28: " (timed out)",
               35: " (TLS handshake failed)", 56: " (connection reset)"}


def _scan_counts(paths: list[str]) -> tuple[int, ...]:
    """Samples per local tar from its headers (seeks over the data, so it is fast even for big shards)."""
    from webdataset.tariterators import base_plus_ext

    counts = []
    for p in paths:
        keys = 0
        last = None
        try:
            with tarfile.open(p, "r:") as tf:
                for m in tf:
                    if not m.isreg():
                        continue
                    key, _ = base_plus_ext(m.name)
                    if key is not None and key != last:
                        keys += 1
                        last = key
                    tf.members.clear()  # keep memory flat on huge shards
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"cannot read shard {p}: {exc}") from None
        counts.append(keys)
    return tuple(counts)


def open_url(url: str) -> IO[bytes]:
    """A readable binary stream for a shard or manifest URL (see the module docstring)."""
    return opener(url)()


def opener(url: str) -> Callable[[], IO[bytes]]:
    """How `url` will be opened; raises DataError up front when nothing here can read its scheme."""
    if not is_remote(url):
        return functools.partial(open, _local_path(url), "rb", buffering=1 << 20)
    scheme = url.split(":", 1)[0].lower()
    from webdataset import gopen  # the function (the package attribute shadows the submodule)

    if scheme == "pipe" or (scheme in ("http", "https") and shutil.which("curl")):
        return functools.partial(gopen, url, "rb")  # curl: retries and redirects
    if scheme in ("http", "https"):
        return functools.partial(urllib.request.urlopen, url, timeout=60)
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
        return lambda: fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:
        fs_error: Exception = exc
    if scheme == "s3" and shutil.which("aws"):
        return functools.partial(gopen, f"pipe:aws s3 cp --quiet {shlex.quote(url)} -", "rb")
    if scheme == "gs" and shutil.which("gsutil"):
        return functools.partial(gopen, url, "rb")
    raise DataError(
        f"cannot open {url}: no reader for {scheme}:// ({fs_error}); install its fsspec backend "
        f"(s3fs, gcsfs) or the aws CLI, or write the URL as pipe:COMMAND"
    )


def cache_root() -> Path:
    """The project's user cache (RGAN_DATA_CACHE, else XDG_CACHE_HOME or ~/.cache, then /rgan-dist): the
    digits shards here, and whatever the users of this pipeline derive from them (e.g. FID reference
    statistics of in-memory data)."""
    env = os.environ.get("RGAN_DATA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rgan-dist"


def digits_shards(resolution: int) -> Path:
    """Shards of sklearn digits at `resolution`, written once per cache (PNG: lossless).

    Several ranks may race here: each writes into its own temporary folder and renames it into
    place; a loser discards its copy (the content is identical whoever wins).
    """
    from data_pipeline.writer import write_shards

    root = cache_root()
    final = root / f"sklearn-digits-r{resolution}-v{DIGITS_CACHE_VERSION}"
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    write_shards([DIGITS], tmp, resolution, fmt="png", shard_size=256, fit="stretch", progress=False)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final
