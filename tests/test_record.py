"""Reading images: 16-bit greyscale scaled, not clipped; oversized headers refused with the file's name. Reading
scores back: a resumed run's record reads as its history."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lora_monitor.record import RunRecord, read_image, read_scores


def test_16_bit_greyscale_is_scaled_to_0_1_not_clipped_to_white(tmp_path):
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # uint16 data: PIL writes a 16-bit greyscale PNG
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # what PIL gives back for a 16-bit PNG
    tensor = read_image(path)
    assert tensor.shape == (3, 2, 2)
    torch.testing.assert_close(tensor[0], torch.tensor([[0.0, 16384 / 65535], [32768 / 65535, 1.0]]), atol=1e-6, rtol=0)
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_a_header_claiming_30000_squared_pixels_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ValueError, match=r"bomb\.png: refused as a decompression bomb"):
        read_image(path)


def test_read_scores_reads_a_resumed_record_as_the_resumed_history(tmp_path):
    """A run evaluated epochs 1 to 4, was resumed from the checkpoint after epoch 2 and evaluated 3 again, then
    crashed while writing; step lines of another monitor in the same folder keep their own history."""
    lines = [
        {"epoch": 1, "unit": "epoch", "value": "a1"}, {"epoch": 2, "unit": "epoch", "value": "a2"},
        {"epoch": 10, "unit": "step", "value": "s10"},
        {"epoch": 3, "unit": "epoch", "value": "a3"}, {"epoch": 4, "unit": "epoch", "value": "a4"},
        {"epoch": 3, "unit": "epoch", "value": "b3"},  # the resumed run: epochs 3 and 4 of the first try are abandoned
        {"epoch": 20, "unit": "step", "value": "s20"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 4, "unit": "ep'  # a torn last line
    (tmp_path / "scores.jsonl").write_text(text, encoding="utf-8")
    assert [line["value"] for line in read_scores(tmp_path)] == ["a1", "a2", "s10", "b3", "s20"]


def test_read_scores_keeps_the_last_line_of_an_evaluation_done_twice(tmp_path):
    record = RunRecord(tmp_path)
    for epoch, value in ((1, 0.1), (2, 0.2), (2, 0.25), (3, 0.3)):  # epoch 2 again: a resume from before its evaluation
        record.append_scores({"epoch": epoch, "unit": "epoch", "value": value})
    assert [(line["epoch"], line["value"]) for line in read_scores(tmp_path)] == [(1, 0.1), (2, 0.25), (3, 0.3)]
