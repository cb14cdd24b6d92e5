"""`flowtok-fast fid-stats IMAGES --inception FILE --out stats.npz`: reference statistics (mu,
sigma of Inception features, clean-fid "clean" resizing) of a folder (searched recursively) or a
.tar of real images. Cached: if --out exists and was made from the same files (names, sizes,
mtimes) and the same Inception file, it is reused."""
from __future__ import annotations

import argparse
import hashlib
import os
import tarfile

from PIL import Image
from tqdm import tqdm

from flowtok_fast.cli_errors import OneLineParser, run, take_debug_flag
from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.frechet import gaussian_stats, load_stats, save_stats
from flowtok_fast.evaluation.inception import InceptionFeatures
from flowtok_fast.evaluation.scoring import file_fingerprint

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if f.lower().endswith(IMAGE_EXTS))
    elif os.path.isfile(source) and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            files = sorted(m.name for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_EXTS))
    else:
        raise UserError(f"{source}: not a folder or a .tar of images")
    if len(files) < 2:
        raise UserError(f"{source}: found {len(files)} image(s) ({', '.join(IMAGE_EXTS)}): need at least 2 for statistics")
    return files


def source_fingerprint(source: str, files: list[str]) -> str:
    h = hashlib.sha256()
    if os.path.isdir(source):
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = os.stat(source)
        h.update(f"{os.path.abspath(source)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def iter_images(source: str, files: list[str], chunk: int):
    def load(f):
        with Image.open(f) as im:
            return im.convert("RGB")

    if os.path.isdir(source):
        for i in range(0, len(files), chunk):
            yield [load(f) for f in files[i:i + chunk]]
        return
    with tarfile.open(source) as tar:
        for i in range(0, len(files), chunk):
            yield [load(tar.extractfile(f)) for f in files[i:i + chunk]]


def reference_stats(source: str, inception: InceptionFeatures, out: str, progress: bool = True):
    """(mu, sigma) of `source`, from the cache at `out` when it matches, else computed and saved."""
    files = list_images(source)
    key = f"{source_fingerprint(source, files)};inception={file_fingerprint(inception.path)};mode=clean"
    if os.path.isfile(out):
        try:
            mu, sigma, meta = load_stats(out)
            if meta.get("key") == key:
                return mu, sigma
        except UserError:
            pass  # unreadable cache: recompute it
    feats = []
    with tqdm(total=len(files), unit="img", desc="fid-stats", disable=not progress) as bar:
        for images in iter_images(source, files, inception.batch_size):
            feats.append(inception(images))
            bar.update(len(images))
    import numpy as np

    mu, sigma = gaussian_stats(np.concatenate(feats))
    save_stats(out, mu, sigma, key=key, num_images=len(files))
    return mu, sigma


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="flowtok-fast fid-stats", description=__doc__)
    p.add_argument("images", help="a folder (recursive) or .tar of real images")
    p.add_argument("--inception", help="clean-fid's TorchScript inception-2015-12-05.pt (local file)")
    p.add_argument("--out", required=True, help="the .npz to write (mu, sigma)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    debug, argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)

    def work():
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
            raise UserError(f"--out {args.out}: folder {out_dir} does not exist or is not writable")
        inception = InceptionFeatures(args.inception, args.device or "cpu", args.batch_size)
        mu, _ = reference_stats(args.images, inception, args.out)
        print(f"wrote {args.out} (mu, sigma of {mu.shape[0]}-d Inception features)")

    return run("fid-stats", work, debug)


if __name__ == "__main__":
    raise SystemExit(main())
