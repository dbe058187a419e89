"""Prepared data sets at a URL: the manifest read whole, the shards streamed, optionally kept in a local cache.

`data.path`, `eval.val_data` and `eval.reference` may name the folder written by `engine.data.prepare`
(manifest.json with shard-*.tar beside it) in three ways besides a local path:

    https://host/cifar10            http(s), streamed by curl (webdataset's opener; curl retries
                                    transient failures: timeouts, 408, 429 and 5xx answers)
    s3://bucket/cifar10             any other scheme through fsspec and its backend for the scheme
                                    (s3fs, gcsfs, adlfs, ...): `pip install s3fs` for s3://
    pipe:aws s3 cp s3://bucket/cifar10/{} -
                                    a shell command that writes one file to stdout; `{}` is replaced
                                    by the file's name (manifest.json, shard-000003.tar)

Shards are read as streams, never downloaded whole before use. A stream that breaks inside a shard
ends that shard early: the loader counts the samples it did not deliver as skipped (the manifest
says how many each shard holds), and a failing exit status of curl or the command is reported the
same way, never raised out of a loader worker. With a `cache_dir` (data.cache_dir) each shard read
from a URL is also written there, under a partial name that is renamed only when the shard is complete
and its sha256 matches the manifest's; later reads (in this run or the next) come from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import warnings
from typing import IO, Iterator

from engine.data import DataError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CURL_SCHEMES = ("http", "https")  # everything else but pipe: goes through fsspec
_CHUNK = 1 << 20
# curl's exit statuses that a reader of the error can act on (see `man curl`, EXIT CODES)
_CURL_STATUS = {6: "the host name does not resolve", 7: "the server refused or did not answer the connection",
                18: "the transfer ended early", 22: "the server answered with an HTTP error such as 404 or 403",
                28: "the transfer timed out", 56: "the connection broke while receiving"}
# (path, mtime, size) of the cache files whose sha256 this process has checked: each is hashed once, and again
# only if it changes
_verified_cache_files: set[tuple[str, int, int]] = set()


def is_url(location: str | os.PathLike) -> bool:
    """Whether a data location is a URL (`scheme://...` or `pipe:COMMAND`) rather than a local path."""
    return isinstance(location, str) and (location.startswith("pipe:") or _SCHEME.match(location) is not None)


def join(location: str, name: str) -> str:
    """The URL of file `name` of the prepared folder at `location` (which may also name its manifest.json)."""
    if location.startswith("pipe:"):
        return location.replace("{}", name)
    folder = location.rsplit("/", 1)[0] if location.endswith(".json") else location.rstrip("/")
    return f"{folder}/{name}"


def url_problem(location: str) -> str | None:
    """Why `location` (a URL) cannot be opened on this machine, checked without any network access; None if it can."""
    if location.startswith("pipe:"):
        return None if "{}" in location else "needs {} where the file name goes (pipe:aws s3 cp s3://b/data/{} -)"
    scheme = _SCHEME.match(location).group(1).lower()
    if scheme in _CURL_SCHEMES:
        return None if shutil.which("curl") else f"{scheme}:// URLs are read with curl, which is not installed"
    try:
        import fsspec
    except ImportError:
        return f"{scheme}:// URLs are read through fsspec: pip install fsspec (and its backend for {scheme}://)"
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        return f"{scheme}:// is no URL scheme that fsspec knows (http(s)://, s3://, gs://, ... or pipe:COMMAND)"
    except ImportError:
        from fsspec.registry import known_implementations

        package = known_implementations[scheme]["class"].split(".")[0]
        return f"{scheme}:// URLs need the {package} package: pip install {package}"
    return None


def _check_openable(url: str) -> None:
    """The reader of a file's URL is there (a pipe: command's `{}` has been filled in by now)."""
    problem = None if url.startswith("pipe:") else url_problem(url)
    if problem is not None:
        raise DataError(f"cannot read {url}: {problem}")


def open_stream(url: str) -> IO[bytes]:
    """A readable binary stream of `url`: curl for http(s) and the shell for pipe: (webdataset's Pipe),
    fsspec otherwise. A Pipe delivers every byte the command wrote, and raises nothing: `close_stream`
    reports the command's exit status."""
    _check_openable(url)
    if url.startswith("pipe:") or _SCHEME.match(url).group(1).lower() in _CURL_SCHEMES:
        from webdataset.gopen import gopen, set_options  # imports torch: only when a URL is read

        stream = gopen(url, "rb")
        # Pipe.read would raise once the command has exited, dropping the bytes of that very read, so
        # that how much of a broken shard arrives would depend on timing
        set_options(stream, ignore_errors=True)
        return stream
    import fsspec

    return fsspec.open(url, "rb").open()


def close_stream(url: str, stream: IO[bytes]) -> None:
    """Closes a stream read to its end; OSError with one line on why, when curl or the command failed."""
    stream.close()
    status = getattr(stream, "status", None)  # a Pipe's exit status
    if status:
        reason = "the command failed" if url.startswith("pipe:") else _CURL_STATUS.get(status, "curl failed")
        raise OSError(f"exit status {status} ({reason})")


def read_bytes(url: str) -> bytes:
    """The whole of a (small) file at `url`, e.g. a manifest; DataError naming the URL when it cannot be read."""
    _check_openable(url)
    try:
        stream = open_stream(url)
        data = stream.read()
        close_stream(url, stream)
    except Exception as exn:  # OSError, or what an fsspec backend raises (missing credentials, ...)
        raise DataError(f"cannot read {url}: {exn}") from exn
    return data


# ----------------------------------------------------------------------------- shards and their cache


class _Download:
    """A shard's stream from its URL, whose read errors are OSErrors. With a cache file, everything read
    also goes to a partial file, which `finish` renames to the cache file when the shard was read whole
    and its sha256 matches the manifest's."""

    def __init__(self, url: str, cache_file: str | None, sha256: str | None):
        self.url, self.cache_file, self.expected, self.partial = url, cache_file, sha256, None
        try:
            self.stream = open_stream(url)
        except OSError:
            raise
        except Exception as exn:  # an fsspec backend's own types (missing credentials, ...): counted the same
            raise OSError(f"cannot open it ({exn})") from exn
        if cache_file is not None:
            os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
            self.partial = f"{cache_file}.{os.getpid()}.partial"  # per process: two workers may read one shard
            self.file, self.digest = open(self.partial, "wb"), hashlib.sha256()

    def __str__(self) -> str:  # webdataset's tar reader appends it to the errors it reports
        return self.url

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except Exception as exn:  # fsspec's backends raise many types for a broken connection
            raise OSError(f"reading failed ({exn})") from exn
        if self.partial is not None:
            self.file.write(data)
            self.digest.update(data)
        return data

    def finish(self) -> None:
        """Reads the tail after the tar's end marker, so that a failing exit status shows (OSError) and
        the cache sees the whole file; then caches it."""
        while self.read(_CHUNK):
            pass
        close_stream(self.url, self.stream)
        if self.partial is not None:
            self._commit()

    def _commit(self) -> None:
        self.file.close()
        if self.digest.hexdigest() != self.expected:
            warnings.warn(f"not caching {self.url}: its sha256 differs from the manifest's (changed, or "
                          "corrupted in transit)", stacklevel=3)
            return
        os.replace(self.partial, self.cache_file)  # atomic: a reader finds no file or the whole one
        _verified_cache_files.add(_identity(self.cache_file))

    def close(self) -> None:
        """Closes the stream (quietly: a command stopped early may exit non-zero) and removes what is
        left of the partial file."""
        with contextlib.suppress(Exception):
            self.stream.close()
        if self.partial is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.remove(self.partial)  # gone already after a commit


def _identity(path: str) -> tuple[str, int, int]:
    status = os.stat(path)
    return path, status.st_mtime_ns, status.st_size


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardOpener:
    """Opens the shards of one prepared data set by location, local path or URL; picklable, so that each
    loader worker holds a copy. `shards`: {location: the manifest's entry (name, num_samples, sha256)}."""

    def __init__(self, shards: dict[str, dict], cache_dir: str = ""):
        self.shards, self.cache_dir = shards, cache_dir

    def _cache_file(self, location: str) -> str | None:
        entry = self.shards.get(location, {})
        if not (self.cache_dir and is_url(location) and entry.get("sha256")):
            return None
        # named by content: a data set prepared again at the same URL is never read from a stale copy
        stem = os.path.splitext(entry["name"])[0]
        return os.path.join(self.cache_dir, f"{stem}-{entry['sha256'][:16]}.tar")

    def _cached(self, location: str) -> str | None:
        """The shard's cache file if it exists and (checked once per process) holds what the manifest says."""
        cache_file = self._cache_file(location)
        if cache_file is None or not os.path.isfile(cache_file):
            return None
        identity = _identity(cache_file)
        if identity not in _verified_cache_files:
            if _sha256_of(cache_file) != self.shards[location]["sha256"]:
                warnings.warn(f"{cache_file} does not match the manifest's sha256: reading {location} again",
                              stacklevel=3)
                with contextlib.suppress(OSError):
                    os.remove(cache_file)
                return None
            _verified_cache_files.add(identity)
        return cache_file

    @contextlib.contextmanager
    def open(self, location: str) -> Iterator[IO[bytes]]:
        """A stream of the shard at `location` (from the cache when it holds the shard). From a URL, the
        stream is read to its end when the block ends normally: a broken transfer or a failing exit status
        then raises OSError, which the loader counts. A block left early (an exception, a closed generator)
        just closes it."""
        local = location if not is_url(location) else self._cached(location)
        if local is not None:
            with open(local, "rb") as file:
                yield file
            return
        download = _Download(location, self._cache_file(location), self.shards.get(location, {}).get("sha256"))
        try:
            yield download
            download.finish()
        finally:
            download.close()
