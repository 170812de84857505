"""What the heuristic filters share: word and sentence splitting, punctuation sets, n-gram counting.

datatrove, whose decisions the filters reproduce, splits English text into words with spaCy's blank
English tokenizer and into sentences with spaCy's rule-based sentencizer. This module is a
dependency-free re-implementation of both, written for speed:

- **words** (``words``, ``chunk_words``): text is cut at whitespace into chunks, and every chunk is
  split the way spaCy's tokenizer does it: leading and trailing punctuation peeled off one piece at a
  time (``(``, quotes, ``...``, a final ``.`` after a lowercase letter, ``'s``, units after a number),
  then infixes (a hyphen or comma between letters, ``/`` or ``:`` before a letter, ``...``) and the
  English special cases (contractions ``do|n't``, ``it|'s``, ``hes`` = ``he|s``; abbreviations
  ``Mr.``, ``e.g.``, ``c.``; emoticons such as ``):``), URLs kept whole. A chunk's split depends on
  the chunk alone, so it is computed once and cached: on real text most chunks are cache hits, and
  a document costs one ``str.split`` and one dictionary look-up per chunk.
- **sentences** (``sentences``, ``count_sentences``): a sentence ends at a word that is one of the
  sentence-final characters (``.``, ``!``, ``?``, ``。`` ...), and the next one starts at the first
  following word that is not punctuation; runs of whitespace other than one space count as words,
  as they are tokens to spaCy.

The rules, exceptions and character classes are spaCy's (MIT License, Explosion AI), rewritten: the
letters they know are spaCy's, script by script; its list of symbols is replaced by Unicode's category
So (newer emoji included). docs/curation.md lists what differs from datatrove and why.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import accumulate, chain
from operator import itemgetter, sub

import numpy as np

from llamaherd.errors import HerdError

# --- character sets ------------------------------------------------------------------------------


def _chars(spec: str) -> frozenset[str]:
    """A set of characters from space-separated hex code points and ranges (``21 2e 61d-61f``)."""
    out = set()
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.update(chr(c) for c in range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# Characters that end a sentence (Unicode's Sentence_Terminal, as datatrove lists it): FineWeb's
# default stop characters, and part of datatrove's punctuation set.
TERMINAL_PUNCTUATION = _chars(
    "21 2e 3f 589 61d-61f 6d4 700-702 7f9 837 839 83d-83e 964-965 104a-104b 1362 1367-1368 166e "
    "1735-1736 17d4-17d6 17d9-17da 1803 1809 1944-1945 1aa8-1aab 1b5a-1b5b 1b5e-1b5f 1b7d-1b7e "
    "1c3b-1c3c 1c7e-1c7f 203c-203d 2047-2049 2e2e 2e3c 2e53-2e54 3002 a4ff a60e-a60f a6f3 a6f7 "
    "a876-a877 a8ce-a8cf a92f a9c8-a9c9 aa5d-aa5f aaf0-aaf1 abeb fe52 fe56-fe57 ff01 ff0e ff1f ff61 "
    "10a56-10a57 10f55-10f59 10f86-10f89 11047-11048 110be-110c1 11141-11143 111c5-111c6 111cd "
    "111de-111df 11238-11239 1123b-1123c 112a9 1144b-1144c 115c2-115c3 115c9-115d7 11641-11642 "
    "1173c-1173e 11944 11946 11a42-11a43 11a9b-11a9c 11c41-11c42 11ef7-11ef8 11f43-11f44 "
    "16a6e-16a6f 16af5 16b37-16b38 16b44 16e98 1bc9f 1da88"
)

# What datatrove counts as punctuation (a word made only of these is a "symbol word" to Gopher):
# the terminal punctuation above, ASCII punctuation, C0 and C1 control characters except tab and
# newline, and a few dozen common non-ASCII marks (quotes, dashes, CJK and full-width punctuation).
PUNCTUATION_SET = (
    TERMINAL_PUNCTUATION
    | _chars("0-8 b-1f 7f-9f 21-2f 3a-40 5b-60 7b-7e")
    | frozenset("«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～")
)

# The characters after which spaCy's sentencizer ends a sentence: the terminal punctuation less
# the characters Unicode added to Sentence_Terminal after spaCy wrote its list (and three Khmer signs).
SENTENCE_END_CHARS = TERMINAL_PUNCTUATION - _chars(
    "61d-61e 837 839 83d-83e 17d4-17d6 17d9-17da 1b7d-1b7e 2e53-2e54 10f55-10f59 10f86-10f89 11944 "
    "11946 11ef7-11ef8 11f43-11f44 16e98"
)

# --- the tokenizer's rules -----------------------------------------------------------------------

# The letters the rules know, by script as spaCy lists them: Latin with its extensions and phonetic
# letters, the Russian, Ukrainian, Tatar and Macedonian Cyrillic letters, the basic Greek letters, and
# whole blocks of scripts without case (their marks, digits and signs included). Letters of other
# scripts (Armenian, Georgian, Thai, other Cyrillic or Greek letters) are not letters to these rules.
_LATIN = "41-5a 61-7a ff21-ff3a ff41-ff5a c0-d6 d8-f6 f8-ff 100-17f 180-1bf 1c4-24f 2c60-2c7b 2c7e-2c7f " \
         "a722-a76f a771-a787 a78b-a78e a790-a7b9 a7fa ab30-ab5a ab60-ab64 1e00-1eff"
_PHONETIC = "250-2af 1d00-1d25 1d6b-1d77 1d79-1d9a"  # lowercase to the rules
_CYRILLIC_GREEK_LOWER = "430-44f 450-451 453-459 45a 45c-45d 491 497 4a3 4af 4bb 4d9 4e9 3ac-3af 3b1-3c9 3cc-3ce"
_CYRILLIC_GREEK_UPPER = "400-401 403-40a 40c-40d 410-42f 490 496 4a2 4ae 4ba 4d8 4e8 386 388-38a 38c 38e-38f 391-3a9"
_UNCASED = (
    "1200-137f 980-9ff 591-5f4 fb1d-fb4f 620-64a 66e-6d5 6e5-6ff 750-77f 8a0-8bd fb50-fbb1 fbd3-fd3d "
    "fd50-fdc7 fdf0-fdfb fe70-fefc 1ee00-1eebb d80-dff 900-97f c80-cff b80-bff c00-c7f ac00-d7af 1100-11ff "
    "3040-309f 30a0-30ff 4e00-9fff 3400-4dbf 20000-2a6df 2a700-2ebef 2e80-2eff 2f00-2fdf 2ff0-2fff 3000-303f "
    "31c0-31ef 3200-33ff f900-faff fe30-fe4f 1f200-1f2ff 2f800-2fa1f"
)
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$ £ € ¥ ฿ US$ C$ A$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₾ ₿".split()
_UNITS = (  # peeled off a number: 5km -> 5 km
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
    "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см см² см³ мм мм² мм³ "
    "нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тбكم كم² كم³ م م² م³ سم سم² سم³ مم "
    "مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب"
).split()
_HYPHENS = ["-", "–", "—", "--", "---", "——", "~"]


def _ranges(spec: str = "", chars: Iterable[str] = ()) -> list[tuple[int, int]]:
    """Code point ranges from hex code points and ranges (``430-44f 451``) and from characters."""
    out = [(ord(c), ord(c)) for c in chars]
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return out


def _class(*parts: list[tuple[int, int]]) -> str:
    """A regular expression matching one character of the given ranges. Characters beyond the BMP get
    a class of their own: with them in it, ``re`` would test a class range by range instead of by table."""
    merged: list[list[int]] = []
    for lo, hi in sorted(r for part in parts for r in part):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])

    def body(rs):
        return "".join(f"\\U{lo:08x}" + (f"-\\U{hi:08x}" if hi > lo else "") for lo, hi in rs)

    bmp = [(lo, min(hi, 0xFFFF)) for lo, hi in merged if lo <= 0xFFFF]
    astral = [(max(lo, 0x10000), hi) for lo, hi in merged if hi > 0xFFFF]
    return f"(?:[{body(bmp)}]|[{body(astral)}])" if astral else f"[{body(bmp)}]"


def _alt(items: Iterable[str]) -> str:
    return "|".join(re.escape(i) for i in items)


@lru_cache(maxsize=1)
def _symbols() -> frozenset[str]:
    """Unicode's "other symbols" (So: dingbats, arrows, emoji ...), split off like punctuation."""
    return frozenset(chr(c) for lo, hi in [(0xA0, 0x3400), (0xA000, 0x10000), (0x10000, 0x20000)]
                     for c in range(lo, hi) if unicodedata.category(chr(c)) == "So")


def _special_cases() -> dict[str, tuple[str, ...]]:
    """English exceptions to the rules: chunk -> its words (contractions, abbreviations, emoticons)."""
    sp: dict[str, tuple[str, ...]] = {}

    def add(*parts: str) -> None:
        sp["".join(parts)] = parts

    def both(word: str, *rest: str) -> None:  # the word and its capitalised form
        add(word, *rest)
        add(word[0].upper() + word[1:], *rest)

    for s in ["'", '\\")', "<space>", "''", "C++", "\\t", "\\n", "—"]:
        add(s)
    for c in "abcdefghijklmnopqrstuvwxyzäöü":
        add(c + ".")
    emoticons = (
        ":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; "
        ":( :-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p "
        ":-p :O :-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD XD "
        "xDD XDD 8D 8-D ^_^ ^__^ ^___^ >.< >.> <.< ._. ;_; -_- -__- v.v V.V v_v V_V o_o o_O O_o O_O 0_o "
        "o_0 0_0 o.O O.o O.O o.o 0.0 o.0 0.o @_@ <3 <33 <333 </3 (^_^) (-_-) (._.) (>_<) (*_*) (¬_¬) ಠ_ಠ "
        "ಠ︵ಠ (ಠ_ಠ) ¯\\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>"
    )
    for e in emoticons.split():
        add(e)
    for u in "cfkCFK":
        add("°", u, ".")
    # pronouns, question words and modal verbs with their clitics, with and without the apostrophe
    both("i", "'m"), both("i", "m"), both("i", "'m", "a"), both("i", "m", "a")
    for w in ["i", "you", "he", "she", "it", "we", "they", "who", "what", "when", "where", "why", "how", "there",
              "that", "this", "these", "those"]:
        for clitics in [("'ll",), ("ll",), ("'ll", "'ve"), ("ll", "ve"), ("'d",), ("d",), ("'d", "'ve"),
                        ("d", "ve")]:
            both(w, *clitics)
    for w in ["i", "you", "we", "they", "who", "what", "when", "where", "why", "how", "there", "these", "those"]:
        both(w, "'ve"), both(w, "ve")
    for w in ["you", "we", "they", "who", "what", "when", "where", "why", "how", "there", "these", "those"]:
        both(w, "'re"), both(w, "re")
    for w in ["he", "she", "it", "who", "what", "when", "where", "why", "how", "there", "that", "this"]:
        both(w, "'s"), both(w, "s")
    for v in ["ca", "could", "do", "does", "did", "had", "may", "might", "must", "need", "ought", "sha", "should",
              "wo", "would"]:
        both(v, "n't"), both(v, "nt"), both(v, "n't", "'ve"), both(v, "nt", "ve")
    for v in ["could", "might", "must", "should", "would"]:
        both(v, "'ve"), both(v, "ve")
    for v in ["ai", "are", "is", "was", "were", "have", "has", "dare"]:
        both(v, "n't"), both(v, "nt")
    for w in ["doin", "goin", "nothin", "nuthin", "ol", "somethin", "lovin", "havin"]:
        both(w), both(w + "'")
    for w in ["em", "ll", "nuff"]:
        add(w), add("'" + w)
    for h in range(1, 13):
        for period in ["a.m.", "am", "p.m.", "pm"]:
            add(str(h), period)
    add("y'", "all"), add("y", "all"), both("how", "'d", "'y"), both("not", "'ve"), both("not", "ve")
    both("can", "not"), both("gon", "na"), both("got", "ta"), both("let", "'s"), both("c'm", "on")
    for s in (
        "'S 's \u2018S \u2018s and/or w/o 're 'Cause 'cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am "
        "o'clock O'clock Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif. Colo. Conn. Dec. Del. Feb. Fla. Ga. Ia. Id. "
        "Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass. Mich. Minn. Miss. N.C. N.D. N.H. N.J. N.M. "
        "N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C. Sep. Sept. Tenn. Va. Wash. Wis. 'd a.m. Adm. "
        "Bros. co. Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. Ltd. Md. Messrs. Mo. "
        "Mont. Mr. Mrs. Ms. p.m. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s."
    ).split():
        add(s)
    for s in ["Ill", "ill", "Its", "its", "Hell", "hell", "Shell", "shell", "Shed", "shed", "were", "Were", "Well",
              "well", "Whore", "whore"]:
        sp.pop(s, None)  # words, not contractions
    for s, parts in list(sp.items()):  # every rule with an apostrophe also holds with a typographic one
        if "'" in s:
            sp[s.replace("'", "’")] = tuple(p.replace("'", "’") for p in parts)
    return sp


class _Rules:
    """The tokenizer's compiled rules, built on first use (a few tens of milliseconds)."""

    def __init__(self):
        latin = _chars(_LATIN)
        lower = _ranges(" ".join([_PHONETIC, _CYRILLIC_GREEK_LOWER, _UNCASED]), (c for c in latin if c.islower()))
        upper = _ranges(" ".join([_CYRILLIC_GREEK_UPPER, _UNCASED]), (c for c in latin if c.isupper()))
        alpha = _ranges(" ".join([_LATIN, _PHONETIC, _CYRILLIC_GREEK_LOWER, _CYRILLIC_GREEK_UPPER, _UNCASED]))
        icons = _ranges(chars=_symbols())  # Unicode's "other symbols" split off like punctuation
        quotes, digits = _ranges(chars=_QUOTES), _ranges("30-39")
        self.lower, self.upper, self.alpha = _class(lower), _class(upper), _class(alpha)
        icon, dots = _class(icons), r"\.\.+|…"
        # infixes split a chunk inside; an infix at the very start is not split off
        alpha_digit = _class(alpha, digits)
        self.infix = re.compile("|".join([
            dots, icon, r"(?<=[0-9])[+\-*^](?=[0-9-])",
            f"(?<={_class(lower, quotes)})\\.(?={_class(upper, quotes)})",
            f"(?<={self.alpha}),(?={self.alpha})",
            f"(?<={alpha_digit})(?:{_alt(_HYPHENS)})(?={self.alpha})",
            f"(?<={alpha_digit})[:<>=/](?={self.alpha})",
        ])).match
        # every infix starts with one of these characters: they are found first, the rules tried there
        starts = _ranges(chars=".…,+-*^–—~:<>=/")
        self.infix_start = re.compile(_class(starts, icons)).finditer
        self.infix_start_bmp = re.compile(_class(starts, [r for r in icons if r[1] <= 0xFFFF])).finditer
        # a URL, or a bare domain such as example.com/page, is one word even where infixes would cut it
        host = "[A-Za-z0-9\u00a1-\uffff]"
        self.url = re.compile(
            r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?(?:"
            r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
            r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))"
            f"|(?:(?:{host}[A-Za-z0-9\u00a1-\uffff_-]{{0,62}})?{host}\\.)+{self.lower}{{2,63}})"
            r"(?::\d{2,5})?(?:[/?#]\S*)?$"
        ).match
        # prefixes and suffixes (see prefix_len and suffix_len)
        self.is_lower = re.compile(self.lower).match
        self.is_upper = re.compile(self.upper).match
        self.symbol_set = _symbols()
        self.punct_set, self.quote_set = frozenset(_PUNCT), frozenset(_QUOTES)
        self.prefix_first = (frozenset("§%=—–+." + _PUNCT + _QUOTES) | frozenset(c[0] for c in _CURRENCY)
                             | self.symbol_set)
        self.one_char_suffix = self.punct_set | self.quote_set | self.symbol_set | frozenset("—–")
        self.before_period = frozenset("0123456789%²-+|(?:)") | self.punct_set | self.quote_set
        self.after_digit: dict[str, list[str]] = {}  # last character -> the currencies and units ending so
        for u in _CURRENCY + _UNITS:
            self.after_digit.setdefault(u[-1], []).append(u)
        self.special = _special_cases()
        # special cases that the affix rules would cut apart (e.g. -> e.g .): adjacent words of a chunk
        # that spell one are merged back
        self.merge = {}
        for s, parts in self.special.items():
            if self.prefix_len(s) or self.suffix_len(s) or self.infixes(s):
                self.merge[tuple(self.split(s, specials=False))] = parts
        self.merge_lengths = sorted({len(k) for k in self.merge}, reverse=True)
        self.merge_first = frozenset(k[0] for k in self.merge)

    def split(self, chunk: str, specials: bool = True) -> list[str]:
        """The words of one whitespace-free chunk, by prefix, suffix, special case, URL and infix rules."""
        special = self.special if specials else {}
        prefixes: list[str] = []
        suffixes: list[str] = []
        s = chunk
        last = -1
        while s and len(s) != last:
            if s in special:
                break
            last = len(s)
            pre = self.prefix_len(s)
            if pre and s[pre:] in special:
                prefixes.append(s[:pre])
                s = s[pre:]
                break
            suf = self.suffix_len(s[pre:]) if pre < len(s) else 0
            if suf and s[:-suf] in special:
                suffixes.append(s[-suf:])
                s = s[:-suf]
                break
            if pre and suf and pre + suf <= len(s):
                prefixes.append(s[:pre])
                suffixes.append(s[-suf:])
                s = s[pre:-suf]
            elif pre:
                prefixes.append(s[:pre])
                s = s[pre:]
            elif suf:
                suffixes.append(s[-suf:])
                s = s[:-suf]
        out = prefixes
        if s:
            if s in special:
                out.extend(special[s])
            elif not (infixes := self.infixes(s)) or self.url(s):
                out.append(s)
            else:
                start = 0
                for a, b in infixes:
                    if a == 0:
                        continue
                    if a != start:
                        out.append(s[start:a])
                    if a != b:
                        out.append(s[a:b])
                    start = b
                if start < len(s):
                    out.append(s[start:])
        out.extend(reversed(suffixes))
        return out

    def prefix_len(self, s: str) -> int:
        """Length of the prefix to peel off ``s``: the first rule that matches among ``§ % = — –``, ``+``
        not before a digit, punctuation, a run of periods, a quote, a currency sign, a symbol; or 0."""
        c = s[0]
        if c not in self.prefix_first:
            return 0
        if c == "+":
            return 0 if s[1:2].isdigit() and s[1:2].isascii() else 1
        if c in "§%=—–" or c in self.punct_set:
            return 1
        if c == ".":
            run = len(s) - len(s.lstrip("."))
            return run if run >= 2 else 0
        if c in self.quote_set:
            return 1
        for cur in _CURRENCY:
            if s.startswith(cur):
                return len(cur)
        return 1 if c in self.symbol_set else 0

    def suffix_len(self, t: str) -> int:
        """Length of the suffix to peel off ``t``: of the rules that match at its end, the one that starts
        first (punctuation, quotes, symbols, a run of periods, 's, a unit or currency after a digit, a
        period after a lowercase letter, a digit, punctuation or two capitals); or 0."""
        c = t[-1]
        n = len(t)
        best = 1 if c in self.one_char_suffix else 0
        if c == "…" and t.endswith("……"):
            best = 2
        elif c == ".":
            run = n - len(t.rstrip("."))
            if run >= 2:
                return run
            if n >= 2:
                p = t[-2]
                if p in self.before_period or self.is_lower(p) or (n >= 3 and (
                        (self.is_upper(p) and self.is_upper(t[-3])) or (t[-3] == "°" and p in "FfCcKk"))):
                    best = 1
        elif c in "sS" and n >= 2 and t[-2] in "'’":
            best = 2
        elif c == "+" and n >= 2 and "0" <= t[-2] <= "9":
            best = 1
        for u in self.after_digit.get(c, ()):
            k = len(u)
            if k > best and n > k and t.endswith(u) and "0" <= t[-k - 1] <= "9":
                best = k
        return best

    def infixes(self, s: str) -> list[tuple[int, int]]:
        """The spans of the infixes of ``s``, left to right without overlap (``re.finditer``'s)."""
        out: list[tuple[int, int]] = []
        end = 0
        # (one class of BMP characters is searched by table; beyond the BMP, range by range)
        for c in (self.infix_start if max(s) > "\uffff" else self.infix_start_bmp)(s):
            i = c.start()
            if i >= end and (m := self.infix(s, i)):
                out.append(m.span())
                end = m.end()
        return out

    def merged(self, words: list[str]) -> list[str]:
        """Apply the special cases that span several words of a chunk: longest first, then leftmost,
        never two that share a word."""
        if self.merge_first.isdisjoint(words):
            return words
        found = [(i, i + k) for i, w in enumerate(words) if w in self.merge_first
                 for k in self.merge_lengths if i + k <= len(words) and tuple(words[i:i + k]) in self.merge]
        if not found:
            return words
        found.sort(key=lambda span: (span[1] - span[0], -span[0]))
        seen: set[int] = set()
        kept = []
        for a, b in reversed(found):
            if a not in seen and b - 1 not in seen:
                kept.append((a, b))
            seen.update(range(a, b))
        out, i = [], 0
        for a, b in sorted(kept):
            out.extend(words[i:a])
            out.extend(self.merge[tuple(words[a:b])])
            i = b
        out.extend(words[i:])
        return out


_rules: _Rules | None = None


def split_chunk(chunk: str) -> tuple[str, ...]:
    """The words of a chunk of text without whitespace (uncached; ``chunk_words`` caches)."""
    global _rules
    if _rules is None:
        _rules = _Rules()
    special = _rules.special
    if chunk in special:
        return special[chunk]
    if chunk.isalpha() or chunk.isdecimal():  # no rule cuts a run of letters, or of digits
        return (chunk,)
    first, last = chunk[0], chunk[-1]
    if (last in ",;:!?" or (last == "." and "a" <= chunk[-2:-1] <= "z")) and chunk[:-1].isalpha():
        # a word and a punctuation mark that is always cut (a period after a lowercase letter is)
        words = [*special.get(chunk[:-1], (chunk[:-1],)), last]
    elif first in "([\"'" and chunk[1:].isalpha():  # an opening mark and a word
        words = [first, *special.get(chunk[1:], (chunk[1:],))]
    else:
        words = _rules.split(chunk)
    return tuple(_rules.merged(words) if len(words) > 1 else words)


class _Cache(dict):
    """key -> value, computed on first look-up; emptied when it grows past ``limit`` entries."""

    def __init__(self, compute, limit: int = 200_000):
        super().__init__()
        self.compute, self.limit = compute, limit

    def __missing__(self, key):
        if len(self) >= self.limit:
            self.clear()
        value = self[key] = self.compute(key)
        return value


def _word_stats(chunk: str) -> tuple[int, int, int, int]:
    ws = chunk_words[chunk]
    if len(ws) == 1 and chunk.isalpha():
        return 1, 1, len(chunk), 1
    n_kept = kept_chars = n_alpha = 0
    for w in ws:
        if w.isalpha():
            n_kept += 1
            kept_chars += len(w)
            n_alpha += 1
        else:
            if not PUNCTUATION_SET.issuperset(w):
                n_kept += 1
                kept_chars += len(w)
            if any(map(str.isalpha, w)):
                n_alpha += 1
    return len(ws), n_kept, kept_chars, n_alpha



chunk_words = _Cache(split_chunk)  # chunk -> its words
chunk_word_count = _Cache(lambda chunk: len(chunk_words[chunk]))
# chunk -> (words, words with a character outside PUNCTUATION_SET, their characters, words with a letter)
chunk_stats = _Cache(_word_stats)


def clear_caches() -> None:
    """Forget every chunk seen so far (to time the filters on text they meet for the first time)."""
    for cache in (chunk_words, chunk_word_count, chunk_stats):
        cache.clear()


def words(text: str) -> list[str]:
    """The words of ``text`` as spaCy's blank English tokenizer gives them, whitespace dropped."""
    return list(chain.from_iterable(map(chunk_words.__getitem__, text.split())))


def count_words(text: str) -> int:
    """``len(words(text))``, faster."""
    return sum(map(chunk_word_count.__getitem__, text.split()))


# --- sentences -----------------------------------------------------------------------------------

_WHITESPACE_RUNS = re.compile(r"(\s+)")
_SENTENCE_END = re.compile(_class(_ranges(chars=SENTENCE_END_CHARS)))
_is_punct_char = _Cache(lambda c: unicodedata.category(c).startswith("P"), limit=100_000)


def _is_punct(word: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation (category P*)."""
    return all(map(_is_punct_char.__getitem__, word))


def _tokens(text: str) -> Iterator[tuple[str, int]]:
    """spaCy's tokens of ``text`` with their offsets: its words, and its whitespace the way spaCy keeps
    it: a run of whitespace is a token, less one leading space when it follows a word."""
    pos = 0
    for i, piece in enumerate(_WHITESPACE_RUNS.split(text)):
        if i % 2:
            ws = piece[1:] if pos and piece[0] == " " else piece
            if ws:
                yield ws, pos + len(piece) - len(ws)
        elif piece:
            start = pos
            for w in chunk_words[piece]:
                yield w, start
                start += len(w)
        pos += len(piece)


def _sentence_breaks(text: str) -> Iterator[int]:
    """Where each sentence after the first ends, by spaCy's sentencizer: a sentence-final character
    that is a token by itself ends a sentence, and the next starts at the first token after it that is
    not punctuation. Yields the end of the previous sentence's last token."""
    after_end = False
    prev_end = 0
    for tok, start in _tokens(text):
        if tok in SENTENCE_END_CHARS:
            after_end = True
        elif after_end and not _is_punct(tok):
            yield prev_end
            after_end = False
        prev_end = start + len(tok)


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences as datatrove's ``split_into_sentences`` cuts English: each piece runs
    from the end of the previous sentence (with the whitespace before it) to the end of its last token,
    the last one to the end of the text."""
    bounds = [0, *_sentence_breaks(text), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def count_sentences(text: str, limit: int | None = None) -> int:
    """``len(sentences(text))``; counting stops at ``limit``."""
    if not _SENTENCE_END.search(text, 0, len(text) - 1):
        return 1  # no sentence-final character before the last one
    n = 1
    for _ in _sentence_breaks(text):
        n += 1
        if limit is not None and n >= limit:
            break
    return n


# --- repetition ----------------------------------------------------------------------------------


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their total length in characters)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


_B = np.uint64(0xA0761D6478BD642F)  # odd, so invertible modulo 2**64
_B_INV = np.uint64(pow(int(_B), -1, 2**64))
_M1 = np.uint64(0xE7037ED1A0B428DB)
_M2 = np.uint64(0x8EBC6AF09C88C6E3)


class NGrams:
    """n-gram statistics of a text's words (``words(text)``), each n-gram reduced to a 64-bit hash.

    No n-gram string is built: the words partition the text's non-whitespace characters, so an n-gram
    joined without separator is a span of ``"".join(text.split())``, and a prefix sum of
    ``char * B**-position`` (modulo 2**64) hashes any span in constant time; an n-gram as a sequence of
    words is a hash of its words' hashes. Two equal hashes are taken for equal n-grams: over the 9
    n-gram sizes of a document of a million words, two different n-grams collide with a chance of
    about one in four million (of a thousand words, one in 10**12)."""

    def __init__(self, text: str):
        chunks = text.split()
        lengths = np.fromiter(map(len, chain.from_iterable(map(chunk_words.__getitem__, chunks))), dtype=np.int64)
        self.n_words = len(lengths)
        self.cum = np.zeros(self.n_words + 1, dtype=np.int64)  # where each word starts in "".join(chunks)
        np.cumsum(lengths, out=self.cum[1:])
        flat = "".join(chunks).encode("utf-32-le", "surrogatepass")
        codes = np.frombuffer(flat, dtype=np.uint32).astype(np.uint64) + np.uint64(1)
        n = len(codes)
        inv = np.full(n + 1, _B_INV, dtype=np.uint64)
        inv[0] = 1
        np.cumprod(inv, out=inv)  # B**-k
        power = np.full(n + 1, _B, dtype=np.uint64)
        power[0] = 1
        np.cumprod(power, out=power)  # B**k
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(codes * inv[:-1], out=prefix[1:])
        # the span flat[a:b] hashes to (prefix[b] - prefix[a]) * B**b; n-grams start and end at word bounds
        self._flat_prefix, self._flat_power = prefix, power
        self._prefix, self._power = prefix[self.cum], power[self.cum]
        h = self.string_keys(1)
        self._word = (h ^ (h >> np.uint64(29))) * _M1  # one hash per word, mixed
        self._tuples = {1: self._word}

    def tuple_keys(self, n: int) -> np.ndarray:
        """A hash of every run of n words, as a sequence of words (the same n-gram joined by spaces)."""
        if n not in self._tuples:
            self._tuples[n] = self.tuple_keys(n - 1)[:-1] * _M2 + self._word[n - 1:]
        return self._tuples[n]

    def string_keys(self, n: int) -> np.ndarray:
        """A hash of every run of n words joined without separator (``"ab" "c"`` is ``"a" "bc"``)."""
        return (self._prefix[n:] - self._prefix[:-n]) * self._power[n:]

    def any_repeated(self, ns: Iterable[int]) -> bool:
        """Whether some run of n words, for some n of ``ns``, repeats (joined without separator)."""
        ns = [n for n in ns if self.n_words - n + 1 > 1]
        if not ns:
            return False
        # A repeated run of n >= n0 words is a string of at least `width` characters (the shortest run of
        # n0 words) found at two word starts; if no `width` characters repeat at word starts, none does.
        n0 = min(ns)
        width = int((self.cum[n0:] - self.cum[:-n0]).min())
        starts = self.cum[:-1]
        starts = starts[starts + width <= self.cum[-1]]
        ends = starts + width
        heads = np.sort((self._flat_prefix[ends] - self._flat_prefix[starts]) * self._flat_power[ends])
        if not (heads[1:] == heads[:-1]).any():
            return False
        for n in ns:
            if self.n_words - n + 1 > 1:
                ordered = np.sort(self.string_keys(n))
                if (ordered[1:] == ordered[:-1]).any():
                    return True
        return False

    def chars(self, n: int) -> np.ndarray:
        """The length of every run of n words, joined without separator."""
        return self.cum[n:] - self.cum[:-n]

    def top_chars(self, n: int) -> int:
        """Characters of the most frequent n-gram joined by spaces, times its count; among equally
        frequent n-grams the first to occur (what ``Counter.most_common(1)`` picks). 0 without n-grams."""
        if self.n_words < n:
            return 0
        keys = self.tuple_keys(n)
        ordered = np.sort(keys)
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        if len(starts) == len(keys):
            i, top = 0, 1  # all different: the first
        else:
            counts = np.diff(np.append(starts, len(keys)))
            top = int(counts.max())
            tops = ordered[starts[counts == top]]
            if len(tops) <= 4:
                i = min(int(np.argmax(keys == t)) for t in tops)
            else:
                i = int(np.flatnonzero(np.isin(keys, tops))[0])
        return (int(self.cum[i + n] - self.cum[i]) + n - 1) * top

    def repeated_over(self, n: int, fraction: float, size: int) -> bool:
        """``repeated_chars(n) / size > fraction``, computed no further than needed: first against an
        upper bound, every repeat of every n-gram counted (the scan counts some of them)."""
        if self.n_words - n + 1 <= 1:
            return 0 / size > fraction
        # (length, 48 bits of hash) in one integer: equal strings, equal lengths; a collision of the 48
        # bits (about one chance in 10**8 for 3,000 words) only raises the bound
        packed = np.sort((self.chars(n).astype(np.uint64) << np.uint64(48)) | (self.string_keys(n) >> np.uint64(16)))
        bound = int((packed[1:][packed[1:] == packed[:-1]] >> np.uint64(48)).sum())
        if not bound / size > fraction:
            return False
        # stop counting one character past the limit: the ratio is then surely over it
        return self.repeated_chars(n, stop_above=fraction * size + 1) / size > fraction

    def repeated_chars(self, n: int, stop_above: float = float("inf")) -> int:
        """Characters of the n-grams (joined without separator) that repeat one seen before, scanning
        left to right and jumping past an n-gram once it is counted, as datatrove's ``find_all_duplicate``
        does; stops counting once past ``stop_above``."""
        m = self.n_words - n + 1
        if m <= 1:
            return 0
        keys = self.string_keys(n)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        new = np.empty(m, dtype=bool)
        new[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
        if new.all():
            return 0  # no n-gram repeats
        group = np.empty(m, dtype=np.int64)
        group[order] = np.cumsum(new) - 1  # n-gram -> index of its string among the distinct ones
        first = order[new][group]  # n-gram -> where its string first occurs (the sort is stable)
        repeats = np.flatnonzero(first < np.arange(m))
        # The scan adds every n-gram it stops at to the seen set, and skips the n - 1 after a repeat. An
        # n-gram's first occurrence is seen unless skipped; a later one is seen if the scan stopped there.
        skipped = bytearray(m)
        stopped_at: set[int] = set()  # strings (by index) the scan stopped at after their first occurrence
        total = 0
        next_stop = 0
        chars = self.chars(n)
        for i, g, f, c in zip(repeats.tolist(), group[repeats].tolist(), first[repeats].tolist(),
                              chars[repeats].tolist()):
            if i < next_stop:
                continue
            if g in stopped_at or not skipped[f]:
                total += c
                if total > stop_above:
                    return total
                skipped[i + 1:i + n] = b"\x01" * (n - 1)
                next_stop = i + n
            stopped_at.add(g)
        return total


class FewNGrams:
    """``NGrams`` for a short text, in plain Python: below a few thousand characters, numpy's cost per
    call outweighs its speed per element. n-grams are compared as strings, exactly."""

    def __init__(self, text: str):
        self.words = words(text)
        self.n_words = len(self.words)

    def _grams(self, n: int) -> Iterator[tuple[str, ...]]:
        return zip(*(self.words[k:] for k in range(n)))

    def top_chars(self, n: int) -> int:
        if self.n_words < n:
            return 0
        gram, count = max(Counter(self._grams(n)).items(), key=itemgetter(1))  # the first of the most frequent
        return (sum(map(len, gram)) + n - 1) * count

    def any_repeated(self, ns: Iterable[int]) -> bool:
        ns = [n for n in ns if self.n_words - n + 1 > 1]
        if not ns:
            return False
        # as NGrams.any_repeated: first the strings of `width` characters at word starts
        cum = [0, *accumulate(map(len, self.words))]
        n0 = min(ns)
        width = min(map(sub, cum[n0:], cum))
        flat = "".join(self.words)
        starts = [a for a in cum[:-1] if a + width <= cum[-1]]
        heads = set(map(flat.__getitem__, map(slice, starts, [a + width for a in starts])))
        if len(heads) == len(starts):
            return False
        for n in ns:
            joined = list(map("".join, self._grams(n)))
            if len(set(joined)) < len(joined):
                return True
        return False

    def repeated_chars(self, n: int, stop_above: float = float("inf")) -> int:
        joined = list(map("".join, self._grams(n)))
        seen: set[str] = set()
        total = i = 0
        while i < len(joined):
            if joined[i] in seen:
                total += len(joined[i])
                if total > stop_above:
                    return total
                i += n
            else:
                seen.add(joined[i])
                i += 1
        return total


    def repeated_over(self, n: int, fraction: float, size: int) -> bool:
        return self.repeated_chars(n, stop_above=fraction * size + 1) / size > fraction


def ngrams(text: str, small: int = 1000) -> NGrams | FewNGrams:
    """The n-gram statistics of ``text``, in plain Python below ``small`` characters, else with numpy."""
    return FewNGrams(text) if len(text) < small else NGrams(text)


# --- parameter checks ----------------------------------------------------------------------------


def check_count(stage: str, name: str, value, *, optional: bool = True, minimum: int = 0) -> None:
    """A whole-number parameter (None allowed when ``optional``) is at least ``minimum``, else a HerdError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"a whole number >= {minimum}" + (" or None" if optional else "")
        raise HerdError(f"{stage}.{name} = {value!r}: expected {expected}")


def check_ratio(stage: str, name: str, value, *, optional: bool = True) -> None:
    """A ratio parameter (None allowed when ``optional``) is a number >= 0, else a HerdError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HerdError(f"{stage}.{name} = {value!r}: expected a number >= 0" + (" or None" if optional else ""))


def check_flag(stage: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise HerdError(f"{stage}.{name} = {value!r}: expected true or false")


def check_strings(stage: str, name: str, value, *, optional: bool = True) -> tuple[str, ...] | None:
    """A list of strings (None allowed when ``optional``), as a tuple; else a HerdError."""
    if value is None and optional:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or \
            not all(isinstance(v, str) and v for v in value):
        raise HerdError(f"{stage}.{name} = {value!r}: expected a list of non-empty strings")
    return tuple(value)
