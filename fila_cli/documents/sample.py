"""A sample document to try fila on: a three-page invoice, written on the spot.

``fila sample invoice.pdf`` writes it, so the README's first command runs for a new user who has
no document at hand. It is built with PyMuPDF alone and is the same, byte for byte, every time:

1. the invoice itself (text layer): supplier, customer, line items;
2. the totals and payment terms (text layer), where "the total due" is;
3. a signed delivery note as a *scanned* page: a grey picture of the page with no text layer, so
   only the vision model can read it (as with real scans).
"""

from __future__ import annotations

from pathlib import Path

import pymupdf

from fila_cli.atomic_files import check_output_folder
from fila_cli.errors import UsageError

# US Letter in points, with a one-inch margin: the most common invoice paper after A4.
PAGE_WIDTH, PAGE_HEIGHT = 612, 792
MARGIN = 72
TITLE_SIZE = 20
BODY_SIZE = 12
# The scanned page is drawn at 150 dpi (72 points per inch * this scale), grey, as office scanners do.
SCAN_SCALE = 150 / 72

SUPPLIER = "Northwind Office Supplies Ltd, 12 Harbour Road, Bristol BS1 4RT"
CUSTOMER = "Contoso Consulting GmbH, Lindenstrasse 5, 10969 Berlin"
LINE_ITEMS = (
    ("Ergonomic office chair", 4, 189.00),
    ("Standing desk, 160 x 80 cm", 2, 449.00),
    ("Monitor arm, dual", 4, 79.50),
    ("Delivery and assembly", 1, 120.00),
)
VAT_RATE = 0.20
CURRENCY = "GBP"


def _money(amount: float) -> str:
    return f"{amount:,.2f} {CURRENCY}"


def _totals() -> tuple[float, float, float]:
    net = sum(quantity * price for _, quantity, price in LINE_ITEMS)
    vat = round(net * VAT_RATE, 2)
    return net, vat, net + vat


def _invoice_page() -> tuple[str, str]:
    rows = "\n".join(f"{name:<32} {quantity:>3} x {price:>8,.2f} = {quantity * price:>9,.2f}"
                     for name, quantity, price in LINE_ITEMS)
    body = (f"Invoice number: INV-2024-0417\nInvoice date: 17 April 2024\n\nFrom: {SUPPLIER}\nTo: {CUSTOMER}\n\n"
            f"Items ({CURRENCY}):\n{rows}\n\nContinued on page 2.")
    return "INVOICE", body


def _totals_page() -> tuple[str, str]:
    net, vat, total = _totals()
    body = (f"Invoice INV-2024-0417, page 2\n\nNet amount: {_money(net)}\nVAT {VAT_RATE:.0%}: {_money(vat)}\n"
            f"Total due: {_money(total)}\n\nPayment terms: 30 days net, due by 17 May 2024.\n"
            "Bank transfer to IBAN GB29 NWBK 6016 1331 9268 19, reference INV-2024-0417.")
    return "TOTALS AND PAYMENT", body


def _delivery_note_page() -> tuple[str, str]:
    body = ("Delivered to Contoso Consulting GmbH on 19 April 2024.\n10 packages received in good condition.\n\n"
            "Received by: M. Weber\nSignature: M. Weber")
    return "DELIVERY NOTE (scanned)", body


def _write_page(page: pymupdf.Page, title: str, body: str) -> None:
    page.insert_text((MARGIN, MARGIN + TITLE_SIZE), title, fontsize=TITLE_SIZE, fontname="hebo")
    box = pymupdf.Rect(MARGIN, MARGIN + 2 * TITLE_SIZE, page.rect.width - MARGIN, page.rect.height - MARGIN)
    if page.insert_textbox(box, body, fontsize=BODY_SIZE, fontname="cour") < 0:
        raise ValueError(f"sample text does not fit on its page: {title}")  # a bug in this module


def _scanned(title: str, body: str) -> pymupdf.Pixmap:
    """A picture of the page, as a scanner makes it: pixels only, no text layer."""
    scratch = pymupdf.open()
    _write_page(scratch.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT), title, body)
    pixmap = scratch[0].get_pixmap(matrix=pymupdf.Matrix(SCAN_SCALE, SCAN_SCALE), colorspace=pymupdf.csGRAY, alpha=False)
    scratch.close()
    return pixmap


def sample_invoice_bytes() -> bytes:
    """The sample invoice as PDF bytes (deterministic: no dates or ids of the moment inside)."""
    document = pymupdf.open()
    for title, body in (_invoice_page(), _totals_page()):
        _write_page(document.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT), title, body)
    scan = document.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT)
    scan.insert_image(scan.rect, pixmap=_scanned(*_delivery_note_page()))
    document.set_metadata({"title": "fila sample invoice", "producer": "fila", "creator": "fila sample"})
    data = document.tobytes(garbage=3, deflate=True, no_new_id=True)
    document.close()
    return data


def write_sample_invoice(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the sample invoice to ``path``; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() != ".pdf":
        raise UsageError(f"{path}: the sample is a PDF; name it *.pdf")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists: choose another name, or pass --force to replace it")
    check_output_folder(path)
    try:
        path.write_bytes(sample_invoice_bytes())
    except OSError as error:
        raise UsageError(f"{path}: cannot write it ({error.strerror or error}); check the folder") from None
    return path


SAMPLE_TOTAL_DUE = _money(_totals()[2])  # what "What is the total due?" should answer
