"""Issue 29 (finding 4, the library side): `memguard index screen` and `memguard index protect` decode a
local file as a viewer shows it, with the server's decoder (memguard.index.decode): a 16-bit PNG, an
EXIF-rotated JPEG or an animation of an indexed picture is reported as a copy; Protect registers the
picture a viewer shows and refuses an animation. Index BUILD decoding is unchanged."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from memguard.index.config import IndexConfig
from tests.index.conftest import run
from tests.viewer_images import exif_rotated_jpeg, png16, smooth


def animated_png(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(buf, format="PNG", save_all=True, append_images=rest, duration=100)
    return buf.getvalue()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, vae_dir):
    from memguard.index.api import FingerprintIndex
    from memguard.index.sources import ImageFolderSource

    tmp = tmp_path_factory.mktemp("cli-decode")
    rng = np.random.default_rng(29)
    images = [smooth(rng) for _ in range(5)] + [smooth(rng, grey=True)]
    (tmp / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp / "images" / f"item{i}.png")
    FingerprintIndex.build(tmp / "index", ImageFolderSource(tmp / "images"), model_dir=vae_dir,
                           cfg=IndexConfig(faces=False), progress=False)
    return tmp, images, rng


def test_cli_screen_sees_16_bit_exif_rotated_and_animated_copies(indexed, capsys):
    tmp, images, _ = indexed
    files = {"png16": png16(images[5][..., 0]), "exif": exif_rotated_jpeg(images[1]),
             "apng": animated_png([np.full((64, 64, 3), 255, np.uint8), images[2]])}
    paths = []
    for name, data in files.items():
        paths.append(tmp / f"{name}.{'jpg' if name == 'exif' else 'png'}")
        paths[-1].write_bytes(data)
    code, screened, err = run(capsys, "index", "screen", str(tmp / "index"), *map(str, paths), "--json")
    assert code == 0, err
    by_name = {r["image"].rsplit("/", 1)[-1].split(".")[0]: r for r in screened["results"]}
    assert by_name["png16"]["is_copy"] and by_name["png16"]["matches"][0]["item_id"] == "item5"
    assert by_name["exif"]["is_copy"] and by_name["exif"]["matches"][0]["item_id"] == "item1"
    assert by_name["apng"]["is_copy"] and by_name["apng"]["matches"][0]["item_id"] == "item2"
    assert by_name["apng"]["views"] == 2
    code, text, _ = run(capsys, "index", "screen", str(tmp / "index"), str(paths[0]))
    assert code == 0 and "COPY of item5" in text


def test_cli_protect_registers_what_a_viewer_shows_and_refuses_an_animation(indexed, capsys, tmp_path):
    tmp, images, rng = indexed
    fresh = smooth(rng, grey=True)
    sixteen = tmp_path / "fresh16.png"
    sixteen.write_bytes(png16(fresh[..., 0]))
    shown = tmp_path / "fresh.png"
    Image.fromarray(fresh).save(shown)
    code, screened, _ = run(capsys, "index", "screen", str(tmp / "index"), str(shown), "--json")
    assert not screened["results"][0]["is_copy"]
    index = tmp_path / "index"
    import shutil
    shutil.copytree(tmp / "index", index)
    code, receipt, err = run(capsys, "index", "protect", str(index), "--image", str(sixteen),
                             "--item-id", "upload-16", "--reason", "takedown", "--json")
    assert code == 0, err
    code, screened, _ = run(capsys, "index", "screen", str(index), str(shown), "--json")
    assert screened["results"][0]["is_copy"] and screened["results"][0]["protected"]
    anim = tmp_path / "anim.png"
    anim.write_bytes(animated_png([fresh, images[0]]))
    code, _, err = run(capsys, "index", "protect", str(index), "--image", str(anim), "--reason", "x")
    assert code == 2 and "image" in err and "anim.png" in err and "frame" in err and "Traceback" not in err
