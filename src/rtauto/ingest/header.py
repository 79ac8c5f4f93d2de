"""Reading what ingest needs from an encoded DICOM instance, without decoding pixel data.

:func:`scan_dataset` walks the top-level elements of an encoded data set (implicit or explicit
VR, either byte order) and proves that every element, every undefined-length sequence item and
every pixel data fragment lies inside the bytes received: a truncated file is detected here,
cheaply, because values are skipped, never converted. :func:`header_attributes` then converts
only the short top-level values that workflow triggers test.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

import rtauto

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "DatasetLayout",
    "FileMeta",
    "HeaderError",
    "build_file_meta",
    "guess_raw_encoding",
    "header_attributes",
    "pixel_data_shortfall",
    "read_file_meta",
    "scan_dataset",
    "transfer_syntax_encoding",
    "uid_value",
]

# A fixed UID derived from pydicom's root: rtauto writes it in every file meta header it builds.
IMPLEMENTATION_CLASS_UID = str(
    generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["rtauto implementation class"])
)
IMPLEMENTATION_VERSION_NAME = f"RTAUTO_{rtauto.__version__}"[:16]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_MAX_DEPTH = 32

# VRs whose short values become trigger attributes; binary numbers only when single-valued.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "ST", "TM", "UI", "UC", "UR"}
)
_NUMBER_VRS = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8}
_MAX_ATTRIBUTE_BYTES = 1024
_SPECIFIC_CHARACTER_SET = 0x00080005
_PIXEL_DATA = 0x7FE00010


class HeaderError(ValueError):
    """The bytes are not a readable DICOM instance; the message says where and why."""


@dataclass(frozen=True)
class DatasetLayout:
    """Where each top-level element of an encoded data set lies: tag -> (VR, offset, length).

    ``data`` is the data set the offsets refer to (inflated for deflated transfer syntaxes).
    VR is ``None`` for implicit VR; length is ``0xFFFFFFFF`` for undefined-length elements.
    """

    data: bytes | memoryview
    implicit_vr: bool
    little_endian: bool
    elements: dict[int, tuple[str | None, int, int]]


def transfer_syntax_encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax; every other syntax is explicit LE."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return False, False
    return False, True


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Scanner:
    def __init__(self, buf: bytes | memoryview, implicit: bool, little: bool):
        self.buf = buf
        self.implicit = implicit
        self.tag_fmt = struct.Struct("<HH" if little else ">HH")
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<L" if little else ">L")

    def truncated(self, tag: int, needed: int, left: int) -> HeaderError:
        return HeaderError(
            f"truncated: element {_tag_text(tag)} needs {needed} bytes but only {max(left, 0)}"
            " remain"
        )

    def elements(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        top: dict[int, tuple[str | None, int, int]] | None,
        in_item: bool,
    ) -> int:
        """Walk elements from ``pos``; returns the offset after them (after an item delimiter
        when ``in_item``)."""
        if depth > _MAX_DEPTH:
            raise HeaderError(f"sequences nested deeper than {_MAX_DEPTH} levels")
        buf, tag_fmt, u16, u32 = self.buf, self.tag_fmt, self.u16, self.u32
        while pos < end:
            if pos + 8 > end:
                raise HeaderError(f"truncated: {end - pos} stray bytes at offset {pos}")
            group, elem = tag_fmt.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == _ITEM_DELIMITER:
                if not in_item:
                    raise HeaderError(f"item delimiter outside an item at offset {pos}")
                return pos + 8
            if group == 0xFFFE:
                raise HeaderError(f"unexpected item tag {_tag_text(tag)} at offset {pos}")
            vr: bytes | None
            if implicit:
                vr = None
                length = u32.unpack_from(buf, pos + 4)[0]
                value_pos = pos + 8
            else:
                vr = bytes(buf[pos + 4 : pos + 6])
                if not (vr.isalpha() and vr.isupper()):
                    raise HeaderError(
                        f"element {_tag_text(tag)} at offset {pos} has no valid VR ({vr!r}):"
                        " not DICOM, or the transfer syntax is wrong"
                    )
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self.truncated(tag, 12, end - pos)
                    length = u32.unpack_from(buf, pos + 8)[0]
                    value_pos = pos + 12
                else:
                    length = u16.unpack_from(buf, pos + 6)[0]
                    value_pos = pos + 8
            if length == _UNDEFINED:
                if vr is None or vr in (b"SQ", b"UN"):
                    # undefined-length UN holds implicit VR little endian items (PS3.5 6.2.2)
                    pos = self.items(value_pos, end, implicit or vr == b"UN", depth + 1, tag)
                else:
                    pos = self.fragments(value_pos, end, tag)
            else:
                if value_pos + length > end:
                    raise self.truncated(tag, length, end - value_pos)
                pos = value_pos + length
            if top is not None:
                top[tag] = (vr.decode() if vr else None, value_pos, length)
        if in_item:
            raise HeaderError("truncated: an item has no item delimiter")
        return pos

    def items(self, pos: int, end: int, implicit: bool, depth: int, owner: int) -> int:
        buf, tag_fmt, u32 = self.buf, self.tag_fmt, self.u32
        while True:
            if pos + 8 > end:
                raise HeaderError(f"truncated: sequence {_tag_text(owner)} has no delimiter")
            group, elem = tag_fmt.unpack_from(buf, pos)
            tag = group << 16 | elem
            length = u32.unpack_from(buf, pos + 4)[0]
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM:
                raise HeaderError(
                    f"sequence {_tag_text(owner)} holds {_tag_text(tag)} where an item belongs"
                )
            if length == _UNDEFINED:
                pos = self.elements(pos + 8, end, implicit, depth, None, in_item=True)
            else:
                if pos + 8 + length > end:
                    raise self.truncated(owner, length, end - pos - 8)
                pos += 8 + length

    def fragments(self, pos: int, end: int, owner: int) -> int:
        buf, tag_fmt, u32 = self.buf, self.tag_fmt, self.u32
        while True:
            if pos + 8 > end:
                raise HeaderError(f"truncated: encapsulated {_tag_text(owner)} has no delimiter")
            group, elem = tag_fmt.unpack_from(buf, pos)
            tag = group << 16 | elem
            length = u32.unpack_from(buf, pos + 4)[0]
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise HeaderError(f"encapsulated {_tag_text(owner)} has a malformed fragment")
            if pos + 8 + length > end:
                raise self.truncated(owner, length, end - pos - 8)
            pos += 8 + length


def scan_dataset(data: bytes | memoryview, transfer_syntax: str) -> DatasetLayout:
    """Check that an encoded data set is complete and locate its top-level elements.

    Raises :class:`HeaderError` for truncated or malformed data.
    """
    if transfer_syntax in DEFLATED_TRANSFER_SYNTAXES:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data) + inflater.flush()
        except zlib.error as exc:
            raise HeaderError(f"deflated data set cannot be inflated: {exc}") from exc
        if not inflater.eof:
            raise HeaderError("truncated: the deflated data set ends before its end marker")
    implicit, little = transfer_syntax_encoding(transfer_syntax)
    if len(data) < 8:
        raise HeaderError(f"not DICOM: a data set of {len(data)} bytes")
    top: dict[int, tuple[str | None, int, int]] = {}
    _Scanner(data, implicit, little).elements(0, len(data), implicit, 0, top, in_item=False)
    return DatasetLayout(data, implicit, little, top)


def uid_value(layout: DatasetLayout, tag: int) -> str | None:
    """A top-level UI value as written (trailing NUL/space padding removed); None if absent."""
    found = layout.elements.get(tag)
    if found is None or found[2] == _UNDEFINED:
        return None
    _vr, pos, length = found
    return bytes(layout.data[pos : pos + length]).decode("ascii", "replace").rstrip("\x00 ")


def _int_value(layout: DatasetLayout, tag: int) -> int | None:
    found = layout.elements.get(tag)
    if found is None or found[2] in (0, _UNDEFINED) or found[2] > 64:
        return None
    vr, pos, length = found
    raw = bytes(layout.data[pos : pos + length])
    vr = vr or dictionary_VR(tag)
    try:
        value = _fast_value(vr, raw, layout.little_endian)
    except (ValueError, struct.error, UnicodeDecodeError):
        return None
    return value if isinstance(value, int) else None


def pixel_data_shortfall(layout: DatasetLayout) -> str | None:
    """Why native (not encapsulated) Pixel Data is shorter than Rows x Columns x Samples x
    Bits Allocated x Frames needs, or None when it is long enough or absent."""
    found = layout.elements.get(_PIXEL_DATA)
    if found is None or found[2] == _UNDEFINED:
        return None
    rows, columns = _int_value(layout, 0x00280010), _int_value(layout, 0x00280011)
    bits = _int_value(layout, 0x00280100)
    if not (rows and columns and bits):
        return None
    samples = _int_value(layout, 0x00280002) or 1
    frames = _int_value(layout, 0x00280008) or 1
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if found[2] < needed:
        return (
            f"truncated: Pixel Data (7FE0,0010) holds {found[2]} bytes but {rows} rows x"
            f" {columns} columns x {samples} samples x {bits} bits x {frames} frames need {needed}"
        )
    return None


# storage SOP classes whose IOD requires pixel data (the Image Pixel module, or the
# Multi-frame Functional Groups with Pixel Data, is mandatory): an instance of one of these
# without it was cut short, e.g. a drop-folder copy that paused at an element boundary
_PIXEL_DATA_REQUIRED = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in (
        "1",
        "1.1",
        "1.1.1",
        "1.2",
        "1.2.1",
        "1.3",
        "1.3.1",  # CR, DX, MG, intra-oral
        "2",
        "2.1",
        "2.2",  # CT, Enhanced CT, Legacy Converted Enhanced CT
        "3.1",
        "6.1",
        "6.2",  # ultrasound
        "4",
        "4.1",
        "4.4",  # MR, Enhanced MR, Legacy Converted Enhanced MR
        "7",
        "7.1",
        "7.2",
        "7.3",
        "7.4",  # secondary capture
        "12.1",
        "12.1.1",
        "12.2",
        "12.2.1",  # XA, RF
        "13.1.1",
        "13.1.3",  # breast tomosynthesis, X-ray 3D
        "20",  # NM
        "66.4",  # Segmentation
        "77.1.4",  # VL photographic
        "128",
        "128.1",
        "130",  # PET, Legacy Converted Enhanced PET, Enhanced PET
        "481.1",  # RT Image
    )
)
_PIXEL_DATA_TAGS = (_PIXEL_DATA, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float


def missing_pixel_data(layout: DatasetLayout, sop_class_uid: str) -> str | None:
    """Why an instance of an image SOP class has no pixel data at all, or None."""
    if sop_class_uid not in _PIXEL_DATA_REQUIRED:
        return None
    if any(tag in layout.elements for tag in _PIXEL_DATA_TAGS):
        return None
    from pydicom.uid import UID

    name = UID(sop_class_uid).name
    return f"truncated: this {name} instance has no Pixel Data (7FE0,0010), which it requires"


def _jsonable(value: Any) -> Any:
    # pydicom's IS, DSfloat, UID and PersonName become plain JSON types
    if isinstance(value, MultiValue | list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}


def _fast_value(vr: str, raw: bytes, little: bool) -> Any:
    """A value without pydicom's conversion machinery (ASCII text and plain numbers)."""
    if vr in _NUMBER_FORMATS:
        return struct.unpack(("<" if little else ">") + _NUMBER_FORMATS[vr], raw)[0]
    text = raw.decode("ascii").rstrip("\x00 ")
    if vr in ("ST", "UT", "UR"):
        return text.rstrip()
    parts = [p.strip() for p in text.split("\\")]
    if vr == "IS":
        values: list[Any] = [int(float(p)) if p else None for p in parts]
    elif vr == "DS":
        values = [float(p) if p else None for p in parts]
    else:
        values = parts
    return values[0] if len(values) == 1 else values


def header_attributes(layout: DatasetLayout) -> dict[str, Any]:
    """Short top-level standard attributes by keyword, as JSON-able values (no pixel data)."""
    attributes: dict[str, Any] = {}
    encoding: list[str] | None = None
    for tag, (vr, pos, length) in layout.elements.items():
        group = tag >> 16
        if group <= 0x0002 or group & 1 or length == _UNDEFINED or length > _MAX_ATTRIBUTE_BYTES:
            continue
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in _TEXT_VRS and _NUMBER_VRS.get(vr) != length:
            continue
        keyword = keyword_for_tag(tag)
        if not keyword:
            continue
        raw = bytes(layout.data[pos : pos + length])
        try:
            if raw.isascii() or vr in _NUMBER_FORMATS:
                value = _fast_value(vr, raw, layout.little_endian)
            else:
                if encoding is None:
                    encoding = _encoding_of(layout)
                element = RawDataElement(
                    tag,
                    None if layout.implicit_vr else vr,
                    length,
                    raw,
                    pos,
                    layout.implicit_vr,
                    layout.little_endian,
                    True,
                    False,
                )
                value = _jsonable(convert_raw_data_element(element, encoding=encoding).value)
        except (ValueError, struct.error, LookupError):
            continue  # one unreadable value must not refuse the instance
        if value is None or value == "" or value == []:
            continue
        attributes[keyword] = value
    return attributes


def _encoding_of(layout: DatasetLayout) -> list[str]:
    found = layout.elements.get(_SPECIFIC_CHARACTER_SET)
    if found is None:
        return ["iso8859"]
    _vr, pos, length = found
    terms = bytes(layout.data[pos : pos + length]).decode("ascii", "replace").rstrip("\x00 ")
    try:
        return convert_encodings([t.strip() or "ISO_IR 6" for t in terms.split("\\")])
    except LookupError:
        return ["iso8859"]


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise HeaderError(f"value of {_tag_text(tag)} is too long for the file meta header")
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def build_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Preamble, ``DICM`` and a group 2 file meta header naming rtauto as the implementation."""
    body = [
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", sop_class_uid.encode("ascii", "replace")),
        _element(0x00020003, b"UI", sop_instance_uid.encode("ascii", "replace")),
        _element(0x00020010, b"UI", transfer_syntax.encode("ascii", "replace")),
        _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode()),
    ]
    if source_ae.strip():
        body.append(_element(0x00020016, b"AE", source_ae.strip().encode("ascii", "replace")))
    meta = b"".join(body)
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(meta))
    return b"\x00" * 128 + b"DICM" + group_length + meta


@dataclass(frozen=True)
class FileMeta:
    """The file meta header of a Part 10 file: its values and where the data set starts."""

    values: dict[int, str]
    dataset_offset: int

    @property
    def transfer_syntax(self) -> str:
        return self.values.get(0x00020010, "")


def read_file_meta(data: bytes | memoryview) -> FileMeta | None:
    """The Part 10 file meta header, or None when there is no ``DICM`` prefix.

    Raises :class:`HeaderError` when the header is present but malformed or truncated.
    """
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        return None
    pos, end = 132, len(data)
    values: dict[int, str] = {}
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise HeaderError("truncated: the file meta header ends early")
            length = struct.unpack_from("<L", data, pos + 8)[0]
            value_pos = pos + 12
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", data, pos + 6)[0]
            value_pos = pos + 8
        else:
            raise HeaderError(f"file meta element (0002,{elem:04X}) has no valid VR")
        if value_pos + length > end:
            raise HeaderError(f"truncated: file meta element (0002,{elem:04X}) ends past the data")
        if vr in (b"UI", b"AE", b"SH"):
            text = bytes(data[value_pos : value_pos + length])
            values[0x00020000 | elem] = text.decode("ascii", "replace").rstrip("\x00 ").strip()
        pos = value_pos + length
    if not values.get(0x00020010):
        raise HeaderError("the file meta header has no TransferSyntaxUID (0002,0010)")
    return FileMeta(values, pos)


def guess_raw_encoding(data: bytes | memoryview) -> str | None:
    """The little-endian transfer syntax of a data set stored without a file meta header, or
    None when the bytes do not start like a DICOM data set (group 0008 first)."""
    if len(data) < 8:
        return None
    group, _elem = struct.unpack_from("<HH", data, 0)
    if group != 0x0008:
        return None
    vr = bytes(data[4:6])
    if vr.isalpha() and vr.isupper():
        return "1.2.840.10008.1.2.1"
    return IMPLICIT_VR_LITTLE_ENDIAN


def known_transfer_syntaxes() -> Sequence[str]:
    """Transfer syntaxes rtauto stores (and the SCP accepts), compressed ones included."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    return list(ALL_TRANSFER_SYNTAXES)
