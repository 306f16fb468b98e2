"""Generate the sample documents: `python samples/make_samples.py [OUTDIR]` (default: this folder).

Writes, deterministically (fixed metadata, no random IDs): invoice.pdf (1 A4 page), report.pdf (4 pages,
revenue by year on pages 2-3) and receipt.jpg (a receipt stored rotated, with EXIF Orientation=6 so that
viewers and `ImageOps.exif_transpose` show it upright). Needs PyMuPDF and Pillow; fonts are built in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pymupdf
from PIL import Image, ImageDraw, ImageFont

A4 = (595, 842)
INK = (0.1, 0.1, 0.1)
GREY = (0.45, 0.45, 0.45)
ACCENT = (0.12, 0.32, 0.55)
FIXED_DATE = "D:20240301120000Z"


def text(page, x, y, s, size=10, bold=False, color=INK, align="left"):
    font = "hebo" if bold else "helv"
    width = pymupdf.get_text_length(s, fontname=font, fontsize=size)
    x = {"left": x, "right": x - width, "center": x - width / 2}[align]
    page.insert_text((x, y), s, fontname=font, fontsize=size, color=color)


def table(page, x, y, widths, rows, size=10, header_fill=(0.9, 0.92, 0.95)):
    """Draw rows (the first is the header); columns after the first are right-aligned. Returns the bottom y."""
    row_h = size * 2
    total = sum(widths)
    page.draw_rect(pymupdf.Rect(x, y, x + total, y + row_h), color=None, fill=header_fill)
    for i, row in enumerate(rows):
        base = y + row_h * i + size * 1.35
        cx = x
        for j, (cell, w) in enumerate(zip(row, widths, strict=True)):
            if j == 0:
                text(page, cx + 6, base, cell, size, bold=i == 0)
            else:
                text(page, cx + w - 6, base, cell, size, bold=i == 0, align="right")
            cx += w
        page.draw_line((x, y + row_h * (i + 1)), (x + total, y + row_h * (i + 1)), color=(0.75, 0.75, 0.75), width=0.5)
    return y + row_h * len(rows)


def save(doc, path, title):
    doc.set_metadata(
        {
            "title": title,
            "author": "idefics-cli samples",
            "creator": "make_samples.py",
            "producer": "PyMuPDF",
            "creationDate": FIXED_DATE,
            "modDate": FIXED_DATE,
        }
    )
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    doc.close()


def make_invoice(path):
    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    page.draw_rect(pymupdf.Rect(0, 0, A4[0], 90), color=None, fill=ACCENT)
    text(page, 50, 50, "Bluebird Office Supply Co.", 20, bold=True, color=(1, 1, 1))
    text(page, 50, 70, "48 Harbor Road, Portland, OR 97201  |  billing@bluebird-supply.example", 9, color=(1, 1, 1))
    text(page, 545, 55, "INVOICE", 24, bold=True, color=(1, 1, 1), align="right")

    y = 130
    for label, value in [
        ("Invoice number", "INV-2024-0117"),
        ("Invoice date", "March 1, 2024"),
        ("Due date", "March 31, 2024"),
        ("Customer ID", "C-20931"),
    ]:
        text(page, 330, y, label, 10, color=GREY)
        text(page, 545, y, value, 10, bold=True, align="right")
        y += 16
    text(page, 50, 130, "Bill to", 10, color=GREY)
    for i, line in enumerate(
        ["Maple Street Dental Clinic", "Attn: Dr. Laura Chen", "900 Maple Street, Suite 4", "Salem, OR 97301"]
    ):
        text(page, 50, 146 + 16 * i, line, 10, bold=i == 0)

    rows = [
        ["Description", "Qty", "Unit price", "Amount"],
        ["Ergonomic office chair", "2", "$289.00", "$578.00"],
        ["Standing desk converter", "1", "$315.00", "$315.00"],
        ["Wireless keyboard", "3", "$49.50", "$148.50"],
        ["Printer paper, box of 10 reams", "4", "$23.75", "$95.00"],
    ]
    y = table(page, 50, 240, [245, 50, 100, 100], rows)
    y += 24
    for label, value in [("Subtotal", "$1,136.50"), ("Shipping & handling", "$98.00"), ("Tax (0%)", "$0.00")]:
        text(page, 430, y, label, 10, color=GREY, align="right")
        text(page, 545, y, value, 10, align="right")
        y += 18
    page.draw_line((300, y - 6), (545, y - 6), color=INK, width=1)
    text(page, 430, y + 12, "Total amount due:", 12, bold=True, align="right")
    text(page, 545, y + 12, "$1,234.50", 12, bold=True, align="right")

    y += 70
    text(page, 50, y, "Payment terms", 11, bold=True)
    for i, line in enumerate(
        [
            "Net 30. Please include the invoice number with your payment.",
            "Bank transfer: First Coast Bank, account 0048-221-907, routing 123000848.",
            "Questions? Call (503) 555-0142.",
        ]
    ):
        text(page, 50, y + 18 + 15 * i, line, 10)
    text(page, A4[0] / 2, 800, "Thank you for your business!", 10, color=GREY, align="center")
    save(doc, path, "Invoice INV-2024-0117")


REVENUE = [
    ("2019", "12.4", "1.1"),
    ("2020", "10.8", "-0.6"),
    ("2021", "15.9", "1.8"),
    ("2022", "24.7", "3.9"),
    ("2023", "19.2", "2.2"),
]  # $ millions; 2022 is clearly the highest


def report_page(doc, number, heading):
    page = doc.new_page(width=A4[0], height=A4[1])
    text(page, 50, 40, "Northwind Trails Inc.  |  Annual Report 2023", 9, color=GREY)
    page.draw_line((50, 48), (545, 48), color=(0.75, 0.75, 0.75), width=0.5)
    text(page, 545, 815, f"Page {number} of 4", 9, color=GREY, align="right")
    if heading:
        text(page, 50, 90, heading, 18, bold=True, color=ACCENT)
    return page


def paragraph(page, y, lines, size=11):
    for line in lines:
        text(page, 50, y, line, size)
        y += size * 1.5
    return y + size


def make_report(path):
    doc = pymupdf.open()
    page = report_page(doc, 1, "")
    page.draw_rect(pymupdf.Rect(0, 200, A4[0], 420), color=None, fill=ACCENT)
    text(page, 50, 290, "Northwind Trails Inc.", 30, bold=True, color=(1, 1, 1))
    text(page, 50, 330, "Annual Report 2023", 22, color=(1, 1, 1))
    text(page, 50, 370, "Outdoor gear, made to last", 12, color=(0.85, 0.9, 1))
    text(page, 50, 490, "Letter from the CEO", 14, bold=True)
    paragraph(
        page,
        520,
        [
            "2023 was a year of consolidation. After the record year of 2022, demand for camping gear",
            "normalized, and we focused on margins, inventory and our new line of repairable backpacks.",
            "We closed the year with revenue of $19.2 million and a net income of $2.2 million.",
            "Thank you to our 140 employees, our retail partners and our customers.",
            "",
            "Maria Okafor, Chief Executive Officer",
        ],
    )

    page = report_page(doc, 2, "Financial highlights")
    y = paragraph(
        page,
        125,
        [
            "Revenue and net income for the last five fiscal years, in millions of US dollars.",
            "Fiscal years end on December 31.",
        ],
    )
    rows = [["Fiscal year", "Revenue ($M)", "Net income ($M)"]] + [list(r) for r in REVENUE]
    y = table(page, 50, y, [165, 165, 165], rows, size=11)
    paragraph(
        page,
        y + 30,
        [
            "Revenue peaked in 2022 at $24.7 million, driven by strong demand for tents and sleeping bags.",
            "2020 was the weakest year, when stores were closed for several months.",
        ],
    )

    page = report_page(doc, 3, "Revenue by year")
    base, left, bar_w, top = 430, 90, 60, 24.7
    page.draw_line((left - 10, base), (left + 5 * 85, base), color=INK, width=1)
    for i, (year, revenue, _) in enumerate(REVENUE):
        h = float(revenue) / top * 260
        x = left + i * 85
        fill = ACCENT if year == "2022" else (0.6, 0.7, 0.82)
        page.draw_rect(pymupdf.Rect(x, base - h, x + bar_w, base), color=None, fill=fill)
        text(page, x + bar_w / 2, base - h - 6, f"${revenue}M", 10, bold=year == "2022", align="center")
        text(page, x + bar_w / 2, base + 16, year, 10, align="center")
    y = 490
    rows = [
        ["Segment (2023)", "Revenue ($M)", "Share"],
        ["Tents & shelters", "7.7", "40%"],
        ["Backpacks", "5.8", "30%"],
        ["Sleeping bags", "3.8", "20%"],
        ["Accessories", "1.9", "10%"],
        ["Total", "19.2", "100%"],
    ]
    table(page, 50, y, [200, 150, 145], rows)

    page = report_page(doc, 4, "Outlook for 2024")
    paragraph(
        page,
        130,
        [
            "We expect revenue between $20 million and $22 million in 2024.",
            "Priorities: open two flagship stores, expand the repair program to all backpacks,",
            "and cut packaging waste by half.",
            "",
            "Investor relations: ir@northwind-trails.example, (206) 555-0199.",
            "Annual meeting: May 15, 2024, 10:00 am, Seattle.",
        ],
    )
    save(doc, path, "Northwind Trails Annual Report 2023")


def make_receipt(path):
    w, h = 520, 880
    im = Image.new("RGB", (w, h), (205, 200, 190))  # the table the receipt lies on
    draw = ImageDraw.Draw(im)
    draw.rectangle((40, 30, w - 40, h - 30), fill=(252, 251, 247))
    big, font, small = (ImageFont.load_default(size=s) for s in (34, 20, 16))
    ink = (30, 30, 30)

    def line(y, left, right="", f=font, center=False):
        if center:
            draw.text((w / 2 - draw.textlength(left, font=f) / 2, y), left, font=f, fill=ink)
            return
        draw.text((70, y), left, font=f, fill=ink)
        if right:
            draw.text((w - 70 - draw.textlength(right, font=f), y), right, font=f, fill=ink)

    line(60, "CORNER BAKERY", f=big, center=True)
    line(110, "123 Main Street, Springfield", f=small, center=True)
    line(134, "Tel (555) 010-2030", f=small, center=True)
    line(180, "2024-03-14  08:42", "Receipt #0457", f=small)
    draw.line((70, 215, w - 70, 215), fill=ink, width=2)
    items = [
        ("2 x Croissant", "$6.50"),
        ("1 x Sourdough loaf", "$7.25"),
        ("1 x Cappuccino", "$4.75"),
        ("1 x Blueberry muffin", "$3.50"),
    ]
    y = 235
    for name, price in items:
        line(y, name, price)
        y += 36
    draw.line((70, y + 4, w - 70, y + 4), fill=ink, width=2)
    line(y + 20, "Subtotal", "$22.00")
    line(y + 52, "Tax 8%", "$1.76")
    line(y + 92, "TOTAL", "$23.76", f=ImageFont.load_default(size=26))
    line(y + 150, "VISA **** 1234", "$23.76", f=small)
    line(y + 176, "Auth 08821A", f=small)
    line(h - 120, "Thank you! Come again.", center=True)
    # Store it rotated 90 degrees counter-clockwise; Orientation=6 tells viewers to turn it clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=80, exif=exif.tobytes())


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    make_invoice(str(out / "invoice.pdf"))
    make_report(str(out / "report.pdf"))
    make_receipt(str(out / "receipt.jpg"))
    for name in ("invoice.pdf", "report.pdf", "receipt.jpg"):
        print(f"{out / name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv)
