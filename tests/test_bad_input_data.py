"""Bad or unusual data where it enters: image modes and bit depths, text columns that hold no text or no
strings, string and missing labels. Each case either converts correctly or is refused naming the problem."""

from __future__ import annotations

import io
import json
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from stage1_tokenizer.data import (
    DataError,
    ImageDataset,
    TextWindowDataset,
    decode_image,
    load_split,
    split_from_records,
    text_dataset,
    to_square,
)

RESOLUTION = 16
# Left half black, a band of mid-grey, right quarter white: the 16-bit values and what [-1, 1] they must become.
GREY_16 = np.zeros((RESOLUTION, RESOLUTION), dtype=np.uint16)
GREY_16[:, 8:12] = 32768
GREY_16[:, 12:] = 65535
EXPECTED = torch.from_numpy(GREY_16.astype(np.float32) / 65535 * 2 - 1)


def image_split(images: list, labels: list | None = None):
    """An in-memory data set of PIL images (datasets encodes them as PNG or TIFF bytes, as on disk)."""
    columns = {"image": images}
    if labels is not None:
        columns["label"] = labels
    return split_from_records(datasets.Dataset.from_dict(columns), "train", "image", "in-memory")


def text_split(texts: list, labels: list | None = None, features: datasets.Features | None = None):
    columns = {"text": texts}
    if labels is not None:
        columns["label"] = labels
    return split_from_records(datasets.Dataset.from_dict(columns, features=features), "train", "text", "in-memory")


# ------------------------------------------------------------------------------------------------ image modes
SIXTEEN_BIT = {
    "I;16 (16-bit PNG)": lambda: Image.fromarray(GREY_16),
    "I;16B (big-endian)": lambda: Image.frombytes("I;16B", GREY_16.shape[::-1], GREY_16.astype(">u2").tobytes()),
    "I (32-bit ints holding 16-bit values)": lambda: Image.fromarray(GREY_16.astype(np.int32)),
    "F (floats in [0, 1])": lambda: Image.fromarray(GREY_16.astype(np.float32) / 65535),
}


@pytest.mark.parametrize("make", SIXTEEN_BIT.values(), ids=SIXTEEN_BIT.keys())
@pytest.mark.parametrize("channels", [1, 3])
def test_high_bit_depth_grey_is_scaled_by_its_bit_depth(make, channels):
    """Not clipped to white (Pillow's convert('L') saturates every value above 255) and not wrapped."""
    image, _ = ImageDataset(image_split([make()]), RESOLUTION, channels)[0]
    assert image.shape == (channels, RESOLUTION, RESOLUTION)
    for channel in image:
        torch.testing.assert_close(channel, EXPECTED, atol=1e-4, rtol=0)


def test_sixteen_bit_keeps_more_than_eight_bits_of_precision():
    ramp = (np.arange(RESOLUTION * RESOLUTION, dtype=np.uint16).reshape(RESOLUTION, RESOLUTION) * 3)  # 0..765
    image = to_square(Image.fromarray(ramp), RESOLUTION, 1)
    assert len(torch.unique(image)) == RESOLUTION * RESOLUTION  # 8 bits would collapse these to 4 levels
    assert float(image.max()) == pytest.approx(765 / 65535 * 2 - 1, abs=1e-5)


def test_sixteen_bit_image_resized_stays_in_range():
    big = np.kron(GREY_16, np.ones((3, 3), dtype=np.uint16))  # 48 x 48 -> resized to 16
    image = to_square(Image.fromarray(big), RESOLUTION, 1)
    assert image.min() >= -1 and image.max() <= 1
    assert float(image[0, 8, 0]) == -1.0 and float(image[0, 8, -1]) == 1.0


def rgba_with_hidden_colour() -> Image.Image:
    """White where opaque, and white hidden under full transparency on the right half."""
    array = np.full((RESOLUTION, RESOLUTION, 4), 255, dtype=np.uint8)
    array[:, 8:, 3] = 0
    return Image.fromarray(array, "RGBA")


def test_transparency_is_composited_over_black():
    image, _ = ImageDataset(image_split([rgba_with_hidden_colour()]), RESOLUTION, 3)[0]
    assert torch.all(image[:, :, :8] == 1.0) and torch.all(image[:, :, 8:] == -1.0)
    grey = Image.fromarray(np.asarray(rgba_with_hidden_colour())[..., [0, 3]], "LA")
    assert decode_image(grey, 0).mode == "L"  # grey + alpha trains one channel, not three
    image, _ = ImageDataset(image_split([grey]), RESOLUTION, 1)[0]
    assert torch.all(image[:, :, :8] == 1.0) and torch.all(image[:, :, 8:] == -1.0)


def test_palette_and_cmyk_become_their_rgb_colours():
    palette = Image.new("P", (RESOLUTION, RESOLUTION), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    cmyk = Image.new("CMYK", (RESOLUTION, RESOLUTION), (0, 255, 255, 0))  # red in CMYK
    split = image_split([palette, cmyk])
    for index in range(2):
        image, _ = ImageDataset(split, RESOLUTION, 3)[index]
        assert image[:, 0, 0].tolist() == [1.0, -1.0, -1.0], index


def test_one_bit_and_eight_bit_grey_are_unchanged():
    array = np.zeros((RESOLUTION, RESOLUTION), dtype=np.uint8)
    array[:, 8:] = 255
    eight_bit = to_square(Image.fromarray(array), RESOLUTION, 1)
    assert torch.equal(to_square(Image.fromarray(array).convert("1"), RESOLUTION, 1), eight_bit)
    assert eight_bit[0, 0, 0] == -1.0 and eight_bit[0, 0, -1] == 1.0


REFUSED = {
    "float-0-255": (lambda: Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32)),
                    r"record 1: float \('F'\) image values must lie in \[0, 1\], found 200\.\.200"),
    "float-nan": (lambda: Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)),
                  r"record 1: float \('F'\) image holds NaN"),
    "int32-negative": (lambda: Image.fromarray(np.full((8, 8), -5, dtype=np.int32)),
                       r"record 1: 32-bit integer \('I'\) image values must lie in 0\.\.65535 \(16-bit\), found -5\.\.-5"),
    "int32-beyond-16-bit": (lambda: Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)),
                            r"found 70000\.\.70000"),
    "int32-holding-8-bit": (lambda: Image.fromarray(np.full((8, 8), 200, dtype=np.int32)),
                            r"record 1: 32-bit integer \('I'\) image holds only values 200\.\.200: 8-bit data"),
}


@pytest.mark.parametrize("make, message", REFUSED.values(), ids=REFUSED.keys())
def test_images_that_cannot_be_read_unambiguously_are_refused(make, message):
    good = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    dataset = ImageDataset(image_split([good, make()]), RESOLUTION, 1)
    assert dataset[0][0].shape == (1, RESOLUTION, RESOLUTION)
    with pytest.raises(DataError, match=message):
        dataset[1]


def test_refused_images_are_skipped_and_counted_with_skip_corrupt():
    good = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    bad = Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32))
    dataset = ImageDataset(image_split([good, bad, good]), RESOLUTION, 1, skip_corrupt=True)
    assert len(dataset) == 2 and dataset.num_skipped == 1


# ---------------------------------------------------------------------------------------------- text columns
NO_TEXT = {
    "all-empty": ["", "", "", ""],
    "all-whitespace": [" ", "\n", "\t ", "   "],
    "empty-or-missing": ["", None, " ", None],
}


@pytest.mark.parametrize("texts", NO_TEXT.values(), ids=NO_TEXT.keys())
def test_a_text_column_without_text_is_refused(texts):
    """Joined by newlines, such records used to train on nothing but the separators."""
    split = text_split(texts * 64)
    with pytest.raises(DataError, match=r"text column 'text' holds no text: all 256 records are empty, whitespace "
                                        r"or missing"):
        text_dataset(split, 32)


def test_an_all_missing_text_column_is_refused():
    with pytest.raises(DataError, match=r"text column 'text' holds no text: all 3 records are missing \(None\)"):
        text_split([None, None, None])


WRONG_TYPES = {
    "bytes": ([b"abc", b"def"], r"text column 'text' holds bytes, not strings; decode them first"),
    "integers": ([1, 2], r"text column 'text' holds int64 values, not strings; cast it first"),
    "lists": ([["a"], ["b"]], r"text column 'text' holds List values, not strings"),
}


@pytest.mark.parametrize("texts, message", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_a_text_column_of_other_types_is_refused(texts, message):
    with pytest.raises(DataError, match=message):
        text_split(texts)


def test_non_string_values_in_a_list_split_are_named():
    from stage1_tokenizer.data import Split

    split = Split([{"text": "fine"}, {"text": b"raw"}], "text", None, "fixture", "fixture")
    with pytest.raises(DataError, match=r"holds bytes values, not strings \(record 1\)"):
        TextWindowDataset(split, 4)


def test_missing_texts_are_skipped_and_counted(capsys):
    texts = ["first line", None, "second line", None, "third"] * 8
    windows = text_dataset(text_split(texts), 16)
    assert "warning: data set 'in-memory': skipped 16 of 40 text records that are missing (None)" in capsys.readouterr().err
    joined = bytes(windows.windows.flatten().tolist()).decode()
    assert "None" not in joined and joined.startswith("first line\nsecond line\nthird\n")


def test_empty_labelled_records_are_skipped_and_counted(capsys):
    texts = ["good film", "", None, "bad film", "  "] * 4
    labels = ["pos", "neg", "neg", "neg", "pos"] * 4
    dataset = text_dataset(text_split(texts, labels), 32)
    assert len(dataset) == 8 and dataset.labels.tolist() == [1, 0] * 4
    err = capsys.readouterr().err
    assert "skipped 12 of 20 text records that are empty, whitespace or missing (4 missing)" in err


# ---------------------------------------------------------------------------------------------------- labels
def test_string_labels_become_sorted_class_names():
    split = text_split(["a", "b", "c", "d"], ["pos", "neg", "pos", "neutral"])
    assert split.class_names == ["neg", "neutral", "pos"]
    assert split.records["label"] == [2, 0, 2, 1]


def test_string_labels_get_the_same_indices_in_every_split(tmp_path):
    """The eval split holds only 'pos': it must still be class 1 (the names come from all splits)."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["x", "y"], "label": ["pos", "neg"]}).to_parquet(folder / "train.parquet")
    datasets.Dataset.from_dict({"text": ["z"], "label": ["pos"]}).to_parquet(folder / "test.parquet")
    train, evaluation = load_split(str(folder), "train", "text"), load_split(str(folder), "eval", "text")
    assert train.class_names == evaluation.class_names == ["neg", "pos"]
    assert evaluation.records["label"] == [1]


@pytest.mark.parametrize("labels", [["pos", None, "neg", None], [0, None, 1, None]], ids=["strings", "integers"])
def test_missing_labels_are_refused(labels):
    with pytest.raises(DataError, match=r"\(train\): 2 of 4 labels are missing \(None\), e\.g\. records \[1, 3\]; "
                                        r"fill them in or drop those records"):
        text_split(["a", "b", "c", "d"], labels)


def test_missing_labels_in_a_class_label_column_are_refused():
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["neg", "pos"]))
    with pytest.raises(DataError, match=r"1 of 3 labels are missing \(None\), e\.g\. records \[2\]"):
        text_split(["a", "b", "c"], [0, 1, None], features=features)


@pytest.mark.parametrize("labels, kind", [([0.0, 1.0, 0.5], "float64"), ([True, False, True], "bool"),
                                          ([[0], [1], [0]], "List")], ids=["floats", "bools", "lists"])
def test_label_columns_that_are_not_classes_are_refused(labels, kind):
    """A float, bool or list 'label' column is not silently dropped: the error names its type and the fixes."""
    with pytest.raises(DataError, match=rf"\(train\): the 'label' column holds {kind}\w* values, which are not "
                                        rf"classes; cast it to integers or strings, or to ClassLabel"):
        text_split(["a", "b", "c"], labels)


# ------------------------------------------------------------------------------------ end to end, stage 1 CLI
def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_grey_alpha_images_with_string_labels_train_one_channel_with_named_classes(tmp_path, fresh_accelerate_state):
    """'LA' PNGs used to be trained as 3 channels; 'dark'/'light' labels were dropped as 'no label column'."""
    from stage1_tokenizer import VQModel
    from stage1_tokenizer.train import cli

    folder = tmp_path / "grey_alpha"
    folder.mkdir()
    for split, size in (("train", 32), ("test", 8)):
        images = [{"bytes": png(np.stack([np.full((8, 8), 7 * i, np.uint8), np.full((8, 8), 255, np.uint8)], -1),
                                "LA"), "path": None} for i in range(size)]
        labels = ["light" if i % 2 else "dark" for i in range(size)]
        features = datasets.Features(image=datasets.Image(), label=datasets.Value("string"))
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            folder / f"{split}.parquet")
    out = tmp_path / "run"
    fresh_accelerate_state()
    cli(["--dataset", str(folder), "--variant", "vqvae", "--preset", "tiny", "--max-steps", "2",
         "--batch-size", "8", "--output-dir", str(out)])
    config = VQModel.from_pretrained(out).config
    assert config.in_channels == 1 and config.class_names == ["dark", "light"]
    assert json.loads((out / "eval_results.json").read_text())["num_examples"] == 8


def test_empty_text_column_is_a_one_line_cli_error(tmp_path, fresh_accelerate_state, capsys):
    from stage1_tokenizer.train import cli

    folder = tmp_path / "blank"
    folder.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"text": [""] * 300}).to_parquet(folder / f"{split}.parquet")
    fresh_accelerate_state()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(["--dataset", str(folder), "--modality", "text", "--variant", "vqvae", "--preset", "tiny",
             "--max-steps", "2", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\||examples/s", line)]
    assert stop.value.code == 2 and "Traceback" not in err
    assert lines == [("error: data set 'blank': text column 'text' holds no text: all 300 records are empty, "
                      "whitespace or missing")]
    assert not (tmp_path / "run" / "model.safetensors").exists()
