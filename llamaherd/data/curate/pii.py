"""`pii`: e-mail addresses, IP addresses and phone numbers are replaced in place, and counted in
``meta.pii`` ({"email": n, "ip": n, "phone": n}, only the kinds found). No document is removed.

The replacements are addresses reserved for documentation (RFC 2606's example.com, RFC 5737's
192.0.2.0/24), so the text keeps the shape of what was there. Phone numbers must have separators
(``+1 415-555-0100``, ``(415) 555-0100``, ``415.555.0100``): a bare run of digits, common in code and
tables, is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)")


@dataclass
class Pii:
    name: ClassVar[str] = "pii"
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    email_replacement: str = "email@example.com"
    ip_replacement: str = "192.0.2.1"
    phone_replacement: str = "555-0100"

    def __call__(self, record: Record) -> None:
        found = {}
        text = record.text
        for kind, on, pattern, replacement in (("email", self.emails, _EMAIL, self.email_replacement),
                                                ("ip", self.ip_addresses, _IPV4, self.ip_replacement),
                                                ("phone", self.phone_numbers, _PHONE, self.phone_replacement)):
            if on:
                text, n = pattern.subn(replacement, text)
                if n:
                    found[kind] = n
        if found:
            record.text = text
            record.meta["pii"] = found
        return None
