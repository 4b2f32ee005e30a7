"""IMS reader on real files, and the errors it gives on bad input."""

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tinyml_dagster import ims

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ims"
SET1 = FIXTURES / "1st_test"
FIRST = SET1 / "2003.10.22.12.06.24"


def test_reads_real_set1_file_like_loadtxt():
    x = ims.read_ims_file(FIRST)
    assert x.shape == (20480, 8) and x.dtype == np.float64
    np.testing.assert_array_equal(x, np.loadtxt(FIRST))
    assert x[0, 0] == -0.022 and x[-1, -1] == -0.276  # first and last cells of the file
    # healthy run-in: every channel centred near -0.1 with an RMS around 0.1 to 0.15
    rms = np.sqrt((x**2).mean(axis=0))
    assert ((rms > 0.07) & (rms < 0.2)).all()


@pytest.mark.parametrize("folder", ["2nd_test", "3rd_test"])
def test_reads_real_four_channel_sets(folder):
    path = next((FIXTURES / folder).iterdir())
    x = ims.read_ims_file(path)
    assert x.shape == (20480, 4)
    np.testing.assert_array_equal(x, np.loadtxt(path))


def test_lists_files_in_time_order_with_timestamps(tmp_path):
    for p in sorted(SET1.iterdir(), reverse=True):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / ".hidden").write_text("ignored")
    paths = ims.list_ims_files(tmp_path)
    assert [p.name for p in paths] == ["2003.10.22.12.06.24", "2003.10.22.12.09.13"]
    assert ims.file_timestamp(paths[1]) == datetime(2003, 10, 22, 12, 9, 13)
    ts = ims.file_timestamps(paths)
    assert ts.dtype == np.dtype("datetime64[ns]") and (ts[1] - ts[0]) == np.timedelta64(169, "s")
    both = ims.read_ims_files(paths, workers=2)
    assert both.shape == (2, 20480, 8)
    np.testing.assert_array_equal(both[1], np.loadtxt(paths[1]))


def test_non_canonical_text_parses_through_the_line_reader(tmp_path):
    # same numbers written differently (CRLF, varying decimals, exponent): the slow path reads them identically
    x = ims.read_ims_file(FIRST)
    lines = ["\t".join(repr(float(v)) if j % 2 else f"{v:.6e}" for j, v in enumerate(row)) for row in x]
    path = tmp_path / "2003.10.22.12.06.24"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    np.testing.assert_array_equal(ims.read_ims_file(path), x)


def _bad_copy(tmp_path, edit):
    lines = FIRST.read_text().splitlines(keepends=True)
    lines = edit(lines)
    path = tmp_path / FIRST.name
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: ls[:99] + ["0.1\t0.2\t0.3\t0.4\t0.5\t0.6\t0.7\n"] + ls[100:], r"line 100: 7 columns, expected 8"),
        (
            lambda ls: ls[:4] + [ls[4].replace("\t", "\tabc", 1).replace("\t", "\t", 1)] + ls[5:],
            r"line 5, column 2: non-numeric cell",
        ),
        (
            lambda ls: ls[:4] + ["-0.1\t0.2\t0.3\t0.4\t0.5\tnan\t0.7\t0.8\n"] + ls[5:],
            r"line 5, column 6: non-numeric cell 'nan'",
        ),
        (
            lambda ls: ls[:4] + ["-0.1\t0.2\t1_0.5\t0.4\t0.5\t0.6\t0.7\t0.8\n"] + ls[5:],
            r"line 5, column 3: non-numeric cell '1_0.5'",
        ),
        (
            lambda ls: ls[:4] + ["-0.1\t0.2\t0.3\t 0.4\t0.5\t0.6\t0.7\t0.8\n"] + ls[5:],
            r"line 5, column 4: non-numeric cell ' 0.4'",
        ),
        (
            lambda ls: ls[:4] + ["-0.1\t0.2\t0.3\t0.4\t0.5\t0.6\t0.7\tInfinity\n"] + ls[5:],
            r"line 5, column 8: non-numeric cell",
        ),
        (lambda ls: ls[:-1], r"line 20480: file ends after 20479 rows, expected 20480"),
        (lambda ls: ls + ls[:1], r"line 20481: more than 20480 rows"),
        (lambda ls: [], r"file is empty"),
        (lambda ls: ["1\t2\t3\n"] * 20480, r"line 1: 3 tab-separated columns"),
    ],
)
def test_bad_file_names_file_and_line(tmp_path, edit, message):
    path = _bad_copy(tmp_path, edit)
    with pytest.raises(ims.IMSFormatError, match=message) as err:
        ims.read_ims_file(path)
    assert str(path) in str(err.value)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / FIRST.name
    with open(path, "wb") as f:
        f.truncate(100_000_000)  # 100 MB (sparse): refused on its size, never read into memory
    with pytest.raises(ims.IMSFormatError, match="file of 100000000 bytes, larger than any IMS file"):
        ims.read_ims_file(path)


def test_bad_directory_and_names(tmp_path):
    with pytest.raises(ims.IMSFormatError, match="does not exist"):
        ims.list_ims_files(tmp_path / "missing")
    with pytest.raises(ims.IMSFormatError, match="is empty"):
        ims.list_ims_files(tmp_path)
    (tmp_path / "2003.10.22.12.06.24").write_text("0.1")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ims.IMSFormatError, match=r"notes.txt: file name 'notes.txt' is not a timestamp"):
        ims.list_ims_files(tmp_path)
    with pytest.raises(ims.IMSFormatError, match="not a timestamp"):
        ims.file_timestamp("2003.13.22.12.06.24")
    with pytest.raises(ims.IMSFormatError, match="does not exist"):
        ims.read_ims_file(tmp_path / "2003.10.22.12.06.25")


def test_mixed_channel_counts_are_refused(tmp_path):
    four = next((FIXTURES / "2nd_test").iterdir())
    shutil.copy(FIRST, tmp_path / FIRST.name)
    shutil.copy(four, tmp_path / "2003.10.22.12.09.13")
    with pytest.raises(ims.IMSFormatError, match=r"2003.10.22.12.09.13, line 1: 4 columns per row, expected 8"):
        ims.read_ims_files(ims.list_ims_files(tmp_path))


@pytest.mark.parametrize("fmt", ["%.3f", "%.1f", "%.6f", "%.9f"])
def test_fast_path_equals_float_of_every_cell(fmt):
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, (50, 8)) * 10.0 ** rng.integers(-2, 6, (50, 8))
    text = "".join("\t".join(fmt % v for v in row) + "\n" for row in values)
    parsed = ims._parse_canonical(text.encode())
    expected = np.array([[float(c) for c in line.split("\t")] for line in text.splitlines()])
    assert parsed is not None
    np.testing.assert_array_equal(parsed, expected)
    # anything else is left to the line reader
    assert ims._parse_canonical(text.replace("\n", "\r\n").encode()) is None
    assert ims._parse_canonical(text.replace("\t", " \t", 1).encode()) is None
