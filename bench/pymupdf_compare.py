"""Which PyMuPDF line to require: render the same hard PDFs with several PyMuPDF installs and compare.

Contract: `python bench/pymupdf_compare.py --python /venv-a/bin/python --python /venv-b/bin/python ...`
1. generates one corpus (with the first interpreter, so every version reads the very same bytes): the
   samples, every PDF of the hostile-input corpus (tests/hostile.py), and hand-built hard cases below
   (CCITT G4, JBIG2, JPX, CMYK + spot colour, AES-256 R6 encryption, shifted xref offsets, transparency,
   huge and rotated pages; with `qpdf` on PATH also qpdf's R6 encryption, object streams, linearization);
2. renders every case in each interpreter through the project's own `idefics_cli.documents` (the code path
   of `ask`/`transcribe`: open, authenticate, rasterize at longest side 1960 px or the case's --dpi),
   saving each page's pixels and the error code of each file that fails;
3. compares every version with the first: same error code, same page count, same image size, identical
   pixels (else the share of differing pixels and the largest channel difference), and prints a Markdown
   table, plus each install's `import pymupdf` time (median of 5, child processes) and what else that
   import loads, and the size of the PyMuPDF distributions (with their own dependencies) in each venv.
Nothing is asserted: the table is the result. Needs only PyMuPDF, Pillow and numpy in each venv.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
W, H = 612, 792  # US letter, points


# ---- a minimal PDF writer (the hard cases need streams that PyMuPDF's API does not write) -------------
class Pdf:
    def __init__(self):
        self.objs: list[bytes | None] = [None, None]  # 1 = catalog, 2 = page tree
        self.pages: list[int] = []

    def add(self, body: bytes | str) -> int:
        self.objs.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(self.objs)

    def stream(self, head: str, data: bytes) -> int:
        return self.add(f"<< {head} /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream")

    def page(self, content: bytes, resources: str = "", size=(W, H), extra: str = "") -> int:
        c = self.stream("", content)
        pid = self.add(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size[0]} {size[1]}] /Contents {c} 0 R "
                       f"/Resources << {resources} >> {extra} >>")
        self.pages.append(pid)
        return pid

    def tobytes(self, xref_shift: int = 0) -> bytes:
        self.objs[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
        kids = " ".join(f"{p} 0 R" for p in self.pages)
        self.objs[1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(self.pages)} >>".encode()
        out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for i, body in enumerate(self.objs, 1):
            offsets.append(len(out))
            out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
        start = len(out)
        out += f"xref\n0 {len(self.objs) + 1}\n0000000000 65535 f \n".encode()
        for off in offsets:
            out += f"{off + xref_shift:010d} 00000 n \n".encode()
        out += f"trailer\n<< /Size {len(self.objs) + 1} /Root 1 0 R >>\nstartxref\n{start}\n%%EOF\n".encode()
        return bytes(out)


def _bitmap(w=1200, h=900):
    """A 1-bit page-like image: text, rules and a filled box (white background)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (w, h), 255)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=40)
    for i in range(8):
        d.text((60, 60 + i * 90), f"Scanned line {i + 1}: INVOICE 2024-{i:02d} total 1,234.{i}0", font=font, fill=0)
    d.rectangle((60, 800, 1140, 860), fill=0)
    return img.convert("1")


def _g4(img) -> bytes:
    """CCITT Group 4 data of a 1-bit image, as Pillow's libtiff writes it (one strip, MSB first)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, "TIFF", compression="group4", tiffinfo={278: img.height})
    tif = Image.open(io.BytesIO(buf.getvalue()))
    offset, count = tif.tag_v2[273], tif.tag_v2[279]
    offset, count = (offset[0], count[0]) if isinstance(offset, tuple) else (offset, count)
    return buf.getvalue()[offset:offset + count]


def _jbig2(img, mmr: bytes) -> bytes:
    """An embedded JBIG2 stream: page information, one immediate generic region coded with MMR, end of page."""
    import struct

    def segment(number: int, kind: int, data: bytes) -> bytes:
        return struct.pack(">IBBBI", number, kind, 0, 1, len(data)) + data

    w, h = img.size
    page_info = struct.pack(">IIIIBH", w, h, 0, 0, 0, 0)
    region = struct.pack(">IIIIB", w, h, 0, 0, 0) + b"\x01" + mmr  # generic region flags: MMR = 1
    return segment(0, 48, page_info) + segment(1, 38, region) + segment(2, 49, b"")


def _image_page(pdf: Pdf, head: str, data: bytes, size=(W, H)) -> None:
    x = pdf.stream(f"/Type /XObject /Subtype /Image {head}", data)
    pdf.page(f"q {size[0] - 72} 0 0 {size[1] - 72} 36 36 cm /Im0 Do Q".encode(), f"/XObject << /Im0 {x} 0 R >>", size)


def hard_cases(root: str) -> list[dict]:
    """Write the hand-built hard PDFs under root; returns [{"name", "path", "password"?, "dpi"?}]."""
    import io
    import zlib

    import pymupdf
    from PIL import Image, ImageDraw

    cases = []

    def save(name: str, data: bytes, **opts) -> None:
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(data)
        cases.append({"name": name, "path": path, **opts})

    bitmap = _bitmap()
    w, h = bitmap.size
    g4 = _g4(bitmap)
    pdf = Pdf()
    _image_page(pdf, f"/Width {w} /Height {h} /ColorSpace /DeviceGray /BitsPerComponent 1 /Filter /CCITTFaxDecode "
                     f"/DecodeParms << /K -1 /Columns {w} /Rows {h} /BlackIs1 true >>", g4)
    raw = zlib.compress(bitmap.tobytes())
    _image_page(pdf, f"/Width {w} /Height {h} /ColorSpace /DeviceGray /BitsPerComponent 1 /Filter /FlateDecode", raw)
    save("ccitt-g4.pdf", pdf.tobytes())  # page 1 CCITT G4, page 2 the same bitmap, Flate: should look alike

    pdf = Pdf()
    _image_page(pdf, f"/Width {w} /Height {h} /ColorSpace /DeviceGray /BitsPerComponent 1 /Filter /JBIG2Decode",
                _jbig2(bitmap, _jbig2_mmr(bitmap)))
    save("jbig2-generic-mmr.pdf", pdf.tobytes())

    photo = Image.new("RGB", (800, 600))
    d = ImageDraw.Draw(photo)
    for y in range(600):
        d.line((0, y, 799, y), fill=(y * 255 // 600, 120, 255 - y * 255 // 600))
    d.ellipse((200, 100, 600, 500), fill=(250, 250, 240), outline=(0, 0, 0), width=8)
    d.text((260, 280), "JPEG 2000 page", fill=(0, 0, 0), font_size=48)
    buf = io.BytesIO()
    photo.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[20])
    pdf = Pdf()
    _image_page(pdf, "/Width 800 /Height 600 /Filter /JPXDecode", buf.getvalue())
    save("jpx.pdf", pdf.tobytes())

    cmyk = Image.new("CMYK", (640, 480), (0, 0, 0, 0))
    d = ImageDraw.Draw(cmyk)
    d.rectangle((40, 40, 300, 220), fill=(255, 0, 0, 0))
    d.rectangle((340, 40, 600, 220), fill=(0, 255, 0, 0))
    d.rectangle((40, 260, 300, 440), fill=(0, 0, 255, 0))
    d.rectangle((340, 260, 600, 440), fill=(0, 0, 0, 255))
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=90)
    pdf = Pdf()
    jpeg = pdf.stream("/Type /XObject /Subtype /Image /Width 640 /Height 480 /ColorSpace /DeviceCMYK "
                      "/BitsPerComponent 8 /Decode [1 0 1 0 1 0 1 0] /Filter /DCTDecode", buf.getvalue())
    tint = pdf.add("<< /FunctionType 2 /Domain [0 1] /C0 [0 0 0 0] /C1 [0 0.6 1 0.1] /N 1 >>")
    spot = pdf.add(f"[/Separation /PANTONE#20Orange /DeviceCMYK {tint} 0 R]")
    content = (b"0.1 0.8 0.9 0 k 36 500 260 250 re f 0 0 0 1 K 4 w 36 500 260 250 re S "
               b"/CS0 cs 0.7 scn 320 500 256 250 re f "
               b"q 540 0 0 405 36 50 cm /Im0 Do Q")
    pdf.page(content, f"/XObject << /Im0 {jpeg} 0 R >> /ColorSpace << /CS0 {spot} 0 R >>")
    cmyk_pdf = pdf.tobytes()
    save("cmyk-spot.pdf", cmyk_pdf)

    doc = pymupdf.open(stream=cmyk_pdf, filetype="pdf")
    encrypted = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    save("aes256-r6.pdf", encrypted, password="user")
    save("aes256-r6-wrong.pdf", encrypted, password="nope")
    save("aes256-r6-none.pdf", encrypted)
    doc.close()

    pdf = Pdf()
    pdf.page(b"0 0 1 rg 36 36 200 200 re f BT /F1 24 Tf 72 700 Tj ET", "")
    pdf.page(b"1 0 0 rg 100 100 300 300 re f", "")
    save("xref-offsets-shifted.pdf", pdf.tobytes(xref_shift=7))
    save("trailing-garbage.pdf", pdf.tobytes() + os.urandom(4096))

    pdf = Pdf()
    gs = pdf.add("<< /Type /ExtGState /BM /Multiply /ca 0.5 /CA 0.5 >>")
    smask = pdf.stream("/Type /XObject /Subtype /Image /Width 256 /Height 1 /ColorSpace /DeviceGray "
                       "/BitsPerComponent 8", bytes(range(256)))
    img = pdf.stream(f"/Type /XObject /Subtype /Image /Width 256 /Height 1 /ColorSpace /DeviceRGB "
                     f"/BitsPerComponent 8 /SMask {smask} 0 R", bytes([200, 30, 30]) * 256)
    content = (b"0 0.6 0 rg 50 300 500 300 re f /GS0 gs 0 0 1 rg 150 200 300 300 re f "
               b"q 500 0 0 120 50 50 cm /Im0 Do Q")
    pdf.page(content, f"/ExtGState << /GS0 {gs} 0 R >> /XObject << /Im0 {img} 0 R >>")
    save("transparency-blend-smask.pdf", pdf.tobytes())

    pdf = Pdf()
    pdf.page(b"0 0 0 rg 0 0 14400 40 re f", "", size=(14400, 200))  # a 200 x 2.8 inch banner
    pdf.page(b"1 0 0 rg 10 10 100 50 re f", "", size=(595, 842), extra="/Rotate 90")
    pdf.page(b"0 0 1 rg 10 10 100 50 re f", "", size=(3, 3))  # a tiny page, scaled up
    save("extreme-pages.pdf", pdf.tobytes())
    huge = pymupdf.open()
    page = huge.new_page(width=14400, height=14400)
    page.insert_text((100, 200), "huge page, text at 300 dpi", fontsize=120)
    save("huge-page-300dpi.pdf", huge.tobytes(), dpi=300)

    qpdf = shutil.which("qpdf")
    if qpdf:
        source = os.path.join(root, "cmyk-spot.pdf")
        for name, args, opts in (
                ("qpdf-r6.pdf", ["--encrypt", "user", "owner", "256", "--"], {"password": "user"}),
                ("qpdf-r6-none.pdf", ["--encrypt", "user", "owner", "256", "--"], {}),
                ("qpdf-object-streams.pdf", ["--object-streams=generate"], {}),
                ("qpdf-linearized.pdf", ["--linearize"], {})):
            out = os.path.join(root, name)
            subprocess.run([qpdf, *args, source, out], check=True)
            cases.append({"name": name, "path": out, **opts})
    return cases


def _jbig2_mmr(bitmap) -> bytes:
    # JBIG2's MMR coding is T.6 with 1 = black; the TIFF G4 data above codes 0 bits as black, so invert.
    from PIL import ImageOps

    return _g4(ImageOps.invert(bitmap.convert("L")).convert("1"))


def generate(root: str) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hostile

    cases = []
    for path in sorted(glob.glob(os.path.join(ROOT, "samples", "*.pdf"))):
        cases.append({"name": "sample-" + os.path.basename(path), "path": path})
    for case in hostile.build(os.path.join(root, "hostile")):
        if not case.name.endswith(".pdf") or not os.path.isfile(case.path):
            continue
        opts = {}
        for flag, value in zip(case.extra, case.extra[1:] + [None]):
            if flag == "--password":
                opts["password"] = value
            elif flag == "--dpi":
                opts["dpi"] = int(value)
        cases.append({"name": "hostile-" + case.name, "path": case.path, **opts})
    os.makedirs(os.path.join(root, "hard"), exist_ok=True)
    cases += hard_cases(os.path.join(root, "hard"))
    return cases


# ---- rendering (runs inside each PyMuPDF install) --------------------------------------------------------
def render(cases_file: str, out_dir: str) -> None:
    sys.path.insert(0, ROOT)
    import numpy as np
    import pymupdf

    from idefics_cli.documents import open_document
    from idefics_cli.errors import IdeficsError

    with open(cases_file) as f:
        cases = json.load(f)
    results = {"pymupdf": pymupdf.__version__, "mupdf": pymupdf.VersionFitz, "cases": {}}
    t0 = time.perf_counter()
    for case in cases:
        res: dict = {"code": "ok", "message": None, "pages": None, "rendered": {}}
        try:
            with open_document(case["path"], password=case.get("password"), dpi=case.get("dpi")) as doc:
                res["pages"] = doc.page_count
                n = doc.page_count
                for p in sorted({*range(1, min(n, 4) + 1), n}):
                    try:
                        img = doc.render(p)
                    except IdeficsError as e:
                        res["rendered"][p] = {"code": e.code, "message": e.message}
                        continue
                    arr = np.asarray(img)
                    name = f"{case['name']}-p{p}.npy"
                    np.save(os.path.join(out_dir, name), arr)
                    res["rendered"][p] = {"size": list(img.size), "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
                                          "file": name, "mean": round(float(arr.mean()), 2)}
        except IdeficsError as e:
            res["code"], res["message"] = e.code, e.message
        results["cases"][case["name"]] = res
    results["render_s"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---- the driver ------------------------------------------------------------------------------------------
PROBE = ("import sys, time; t = time.perf_counter(); import pymupdf; dt = time.perf_counter() - t; "
         "print(dt, ','.join(m for m in ('pymupdf4llm', 'pymupdf.layout', 'onnxruntime', 'networkx') "
         "if m in sys.modules))")
SIZE = ("import json, os, sys\nfrom importlib.metadata import distribution, PackageNotFoundError\n"
        "import re\n"
        "def deps(name, seen):\n"
        "    key = re.sub(r'[-_.]+', '-', name).lower()\n"
        "    if key in seen: return\n"
        "    try: d = distribution(name)\n"
        "    except PackageNotFoundError: return\n"
        "    seen[key] = sum(os.path.getsize(d.locate_file(f)) for f in d.files or [] "
        "if os.path.exists(d.locate_file(f)))\n"
        "    for r in d.requires or []:\n"
        "        if 'extra ==' not in r: deps(re.split(r'[ ;<>=!~\\[(]', r, 1)[0], seen)\n"
        "seen = {}\ndeps('pymupdf', seen)\nprint(json.dumps(seen))\n")


def compare(base: dict, other: dict, base_dir: str, other_dir: str) -> dict[str, str]:
    import numpy as np

    verdicts = {}
    for name, a in base["cases"].items():
        b = other["cases"].get(name)
        if b is None:
            verdicts[name] = "missing"
        elif a["code"] != b["code"]:
            verdicts[name] = f"code {a['code']} vs {b['code']}"
        elif a["pages"] != b["pages"]:
            verdicts[name] = f"pages {a['pages']} vs {b['pages']}"
        else:
            notes = []
            for p, ra in a["rendered"].items():
                rb = b["rendered"].get(p, {})
                if "sha256" not in ra or "sha256" not in rb:
                    if ra.get("code") != rb.get("code"):
                        notes.append(f"p{p} {ra.get('code', 'ok')} vs {rb.get('code', 'ok')}")
                elif ra["size"] != rb["size"]:
                    notes.append(f"p{p} size {ra['size']} vs {rb['size']}")
                elif ra["sha256"] != rb["sha256"]:
                    x = np.load(os.path.join(base_dir, ra["file"])).astype(np.int16)
                    y = np.load(os.path.join(other_dir, rb["file"])).astype(np.int16)
                    diff = np.abs(x - y)
                    share = float((diff.max(axis=2) > 0).mean())
                    notes.append(f"p{p} {share:.3%} px differ, max {int(diff.max())}")
            verdicts[name] = "; ".join(notes) or "identical"
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", required=True,
                        help="an interpreter with one PyMuPDF version (repeat; the first is the baseline)")
    parser.add_argument("--work", help="folder for the corpus and renders (default: a temporary folder)")
    parser.add_argument("--render", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        render(*args.render)
        return 0
    if args.generate:
        cases = generate(args.generate)
        with open(os.path.join(args.generate, "cases.json"), "w") as f:
            json.dump(cases, f, indent=1)
        return 0
    work = args.work or tempfile.mkdtemp(prefix="pymupdf-compare-")
    os.makedirs(work, exist_ok=True)
    me = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([args.python[0], me, "--python", "-", "--generate", work], check=True, env=env)
    cases_file = os.path.join(work, "cases.json")
    runs, probes, sizes = [], [[] for _ in args.python], []
    for k, py in enumerate(args.python):
        out = os.path.join(work, f"render-{k}")
        os.makedirs(out, exist_ok=True)
        subprocess.run([py, me, "--python", "-", "--render", cases_file, out], check=True, env=env)
        with open(os.path.join(out, "results.json")) as f:
            runs.append((json.load(f), out))
    for _ in range(5):  # interleaved import timings, medians of 5
        for k, py in enumerate(args.python):
            line = subprocess.run([py, "-c", PROBE], check=True, capture_output=True, text=True).stdout.split()
            probes[k].append((float(line[0]), line[1] if len(line) > 1 else ""))
    for py in args.python:
        sizes.append(json.loads(subprocess.run([py, "-c", SIZE], check=True, capture_output=True,
                                               text=True).stdout))

    base, base_dir = runs[0]
    labels = [f"{r['pymupdf']} (MuPDF {r['mupdf']})" for r, _ in runs]
    print(f"corpus: {len(base['cases'])} PDFs in {work}; baseline {labels[0]}\n")
    print("| install | import pymupdf (median of 5) | also imported | PyMuPDF + its deps on disk | render all |")
    print("|---|---|---|---|---|")
    for k, (r, _) in enumerate(runs):
        total = sum(sizes[k].values()) / 1e6
        heavy = ", ".join(f"{n} {s / 1e6:.0f}" for n, s in sorted(sizes[k].items(), key=lambda x: -x[1])[:5])
        print(f"| {labels[k]} | {statistics.median(t for t, _ in probes[k]):.2f} s | {probes[k][0][1] or '-'} | "
              f"{total:.0f} MB ({heavy}) | {r['render_s']:.1f} s |")
    print()
    verdicts = [compare(base, r, base_dir, d) for r, d in runs[1:]]
    print("| case | result (" + labels[0] + ") | " + " | ".join(f"vs {lab}" for lab in labels[1:]) + " |")
    print("|---|---|" + "---|" * len(verdicts))
    same = [0] * len(verdicts)
    for name, a in base["cases"].items():
        pages = ", ".join(f"p{p} mean {r['mean']}" if "mean" in r else f"p{p} {r['code']}"
                          for p, r in a["rendered"].items())
        outcome = a["code"] if a["code"] != "ok" else f"ok, {a['pages']} p ({pages})"
        row = [v[name] for v in verdicts]
        for k, v in enumerate(row):
            same[k] += v == "identical"
        print(f"| {name} | {outcome} | " + " | ".join(row) + " |")
    print("\nidentical to the baseline: " + ", ".join(f"{lab}: {n}/{len(base['cases'])}"
                                                      for lab, n in zip(labels[1:], same)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
