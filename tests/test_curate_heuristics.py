"""The heuristic filters (gopher_quality, gopher_repetition, c4_quality, fineweb_quality): their decisions
and reasons against datatrove's filters on a mixed corpus, their word and sentence splitting against
spaCy's (what datatrove uses), each rule on small texts, parameters, errors and pickling."""

from __future__ import annotations

import dataclasses
import pickle
import random
import re

import pytest

from llamaherd.data.curate import text as T
from llamaherd.data.curate.base import Record
from llamaherd.data.curate.c4_quality import C4Quality
from llamaherd.data.curate.fineweb_quality import FineWebQuality
from llamaherd.data.curate.gopher_quality import GopherQuality
from llamaherd.data.curate.gopher_repetition import GopherRepetition
from llamaherd.errors import HerdError

STAGES = [GopherQuality, GopherRepetition, C4Quality, FineWebQuality]
MIN_AGREEMENT = 0.99


def run(stage, text: str) -> tuple[str | None, str]:
    """(reason or None, the record's text afterwards)."""
    record = Record(id="t", text=text, source="test")
    return stage(record), record.text


# ---- datatrove, where installed (the dev extra) ---------------------------------------------------


def datatrove_twin(stage):
    """datatrove's filter with the same parameters, or None without datatrove."""
    filters = pytest.importorskip("datatrove.pipeline.filters")
    names = {"gopher_quality": "GopherQualityFilter", "gopher_repetition": "GopherRepetitionFilter",
             "c4_quality": "C4QualityFilter", "fineweb_quality": "FineWebQualityFilter"}
    params = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
    return getattr(filters, names[stage.name])(**params)


def datatrove_run(twin, text: str) -> tuple[str | None, str]:
    from datatrove.data import Document

    doc = Document(text=text, id="t")
    result = twin.filter(doc)
    return (None if result is True else result[1]), doc.text


def check(stage, text: str, reason: str | None) -> None:
    """``stage`` gives ``reason`` for ``text``, and so does datatrove's filter when it is installed."""
    assert run(stage, text)[0] == reason
    try:
        import datatrove  # noqa: F401
    except ImportError:
        return
    assert datatrove_run(datatrove_twin(stage), text)[0] == reason, "datatrove decides otherwise"


# ---- agreement with datatrove on the mixed corpus --------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    from curate_corpus import mixed_corpus

    return mixed_corpus()


@pytest.fixture(scope="module")
def decisions(corpus):
    """stage name -> [(doc id, (our reason, our text), (datatrove's reason, its text))]."""
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    out = {}
    for cls in STAGES:
        stage = cls()
        twin = datatrove_twin(stage)
        out[stage.name] = [(doc_id, run(stage, text), datatrove_run(twin, text)) for doc_id, text in corpus]
    return out


def test_the_corpus_is_mixed(corpus):
    kinds = {doc_id.split(":")[0] for doc_id, _ in corpus}
    assert kinds == {"prose", "code", "web", "list", "spam", "boilerplate", "lang", "social", "short", "edge"}
    assert 500 <= len(corpus) <= 800
    assert len({doc_id for doc_id, _ in corpus}) == len(corpus)
    scripts = "".join(text for doc_id, text in corpus if doc_id.startswith("lang"))
    for sample in ["é", "ß", "ж", "λ", "公", "の", "니", "ع", "ש", "ह", "ก", "ა"]:
        assert sample in scripts


@pytest.mark.parametrize("name", [cls.name for cls in STAGES])
def test_decisions_and_reasons_agree_with_datatrove(decisions, name):
    rows = decisions[name]
    n = len(rows)
    same_decision = [(ours[0] is None) == (theirs[0] is None) for _, ours, theirs in rows]
    same_reason = [ours[0] == theirs[0] for _, ours, theirs in rows]
    kept = sum(theirs[0] is None for _, _, theirs in rows)
    summary = (f"{name}: decisions agree on {sum(same_decision)}/{n}, reasons on {sum(same_reason)}/{n}; "
               f"datatrove keeps {kept}")
    print(summary)
    differ = [f"  {doc_id}: ours {ours[0]!r}, datatrove {theirs[0]!r}: {ours[1][:80]!r}"
              for (doc_id, ours, theirs), same in zip(rows, same_reason) if not same]
    assert sum(same_decision) >= MIN_AGREEMENT * n and sum(same_reason) >= MIN_AGREEMENT * n, \
        summary + "\n" + "\n".join(differ)
    # the corpus exercises the filter both ways
    assert 0.1 * n <= kept <= 0.9 * n, summary


def test_c4_keeps_the_same_lines_as_datatrove(decisions):
    both_keep = [(doc_id, ours[1], theirs[1]) for doc_id, ours, theirs in decisions["c4_quality"]
                 if ours[0] is None and theirs[0] is None]
    assert len(both_keep) > 100
    assert [doc_id for doc_id, a, b in both_keep if a != b] == []


def test_every_reason_of_datatrove_occurs_in_the_corpus(decisions):
    seen = {ours[0] for rows in decisions.values() for _, ours, _ in rows}
    for reason in ["gopher_short_doc", "gopher_below_alpha_threshold", "gopher_enough_stop_words",
                   "gopher_above_avg_threshold", "gopher_below_avg_threshold", "gopher_too_many_hashes",
                   "gopher_too_many_end_ellipsis", "dup_para_frac", "dup_line_frac", "top_2_gram",
                   "duplicated_5_n_grams", "curly_bracket", "lorem_ipsum", "too_few_sentences",
                   "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"]:
        assert reason in seen, reason


# ---- words and sentences against spaCy --------------------------------------------------------


def test_words_are_datatrove_s_words_on_the_corpus(corpus):
    pytest.importorskip("spacy")
    from datatrove.utils.text import split_into_words

    differ = [doc_id for doc_id, text in corpus if T.words(text) != split_into_words(text)]
    assert differ == []
    for _, text in corpus[::7]:
        assert T.count_words(text) == len(T.words(text))


def test_sentences_are_datatrove_s_sentences(corpus):
    pytest.importorskip("spacy")
    from datatrove.utils.text import split_into_sentences

    lines = [line.strip() for _, text in corpus for line in text.splitlines() if line.strip()][::25]
    texts = lines + [text for _, text in corpus if len(text) < 3000]
    rng = random.Random(7)
    pieces = ["The", "cat", "sat", ".", "!", "?", "...", "Mr.", "e.g.", "U.S.", "end.", '"Hi."', "(ok)", "3.14",
              "—", "'", "«", "»", "。", "日本", "¿", "I", "don't", "।", "!!", "?!", "…", "-", ":)", "):", "A.", "c.",
              "#", ".\"", "!)", "1."]
    spaces = [" "] * 8 + ["  ", "\n", "\n\n", "\t", " \n", "\n ", "\u00a0", " \t "]
    texts += ["".join(rng.choice(pieces) + rng.choice(spaces) for _ in range(rng.randint(0, 20))) for _ in range(1500)]
    differ = [t for t in texts if T.sentences(t) != split_into_sentences(t)]
    assert differ == []
    for t in texts[::5]:
        assert T.count_sentences(t) == len(T.sentences(t))
        assert T.count_sentences(t, limit=3) >= min(3, len(T.sentences(t)))


def _random_chunks(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
             ".,:;!?'\"()[]{}<>-_/\\#*&%$@+=~^|`", "éèàçüöäßñøÉÀÇÜÖÄ", "абвгдеёжзийклмнАБВГД", "αβγδεζηθλμπσςωΑΒΓΔΩάέ",
             "日本語中文字の文章です", "ابتثجحخدذر", "אבגדהוזחט", "กขคงจฉ", "աբգդեզէ", "აბგდევზ", "कखगघङ",
             "…«»“”‘’„‚–—·¿¡§°©®™€£¥₹₽", "。、，！？；：（）「」【】《》", "😀😂👍🎉❤✓★☆→■●", "\u0301\u200b\u00ad",
             "ʼʻˈː", "ǅǈǋ", "ⅰⅱ①②", "½²³", "﹒﹖！．？｡", "।॥", "ー"]
    words = ["the", "don't", "it's", "e.g.", "U.S.", "Mr.", "http://x.com/a", "www.a.org", "3.14", "1,000", "a.m.",
             "5pm", "km", "US$", "C$", ":)", ":-(", "):", "'s", "n't", "...", "--", "°C", "hes", "gonna", "cannot",
             "o'clock", "y'all", "<3", "^_^", "5km", "10%", "99+", "+1", "……", "5m²", "ABC.", "Ab.", "A.", "x).", "%."]
    out = []
    while len(out) < n:
        chunk = "".join(rng.choice(words) if rng.random() < 0.25 else
                        "".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
                        for pool in [rng.choice(pools) for _ in range(rng.randint(1, 4))])
        if chunk and not any(c.isspace() for c in chunk):
            out.append(chunk)
    return out


def test_chunks_split_as_spacy_splits_them():
    spacy = pytest.importorskip("spacy")
    tokenizer = spacy.blank("en").tokenizer
    rng = random.Random(5)
    ascii_ = [
        "".join(rng.choice("aB._(),:'\"s5m-/!?[]{}<>#*&%$+=~^|@\\") for _ in range(rng.randint(1, 8)))
        for _ in range(10_000)
    ]
    differ = [(c, T.split_chunk(c)) for c in _random_chunks(20_000, seed=3) + ascii_
              if list(T.split_chunk(c)) != [t.text for t in tokenizer(c)]]
    assert differ == []


def test_character_classes_are_spacy_s_and_datatrove_s():
    pytest.importorskip("spacy")
    from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION
    from spacy.lang.char_classes import ALPHA, ALPHA_LOWER, ALPHA_UPPER
    from spacy.pipeline.sentencizer import Sentencizer

    assert T.TERMINAL_PUNCTUATION == TERMINAL_PUNCTUATION
    assert T.PUNCTUATION_SET == PUNCTUATION_SET
    assert T.SENTENCE_END_CHARS == set(Sentencizer.default_punct_chars)
    T.split_chunk("x")  # builds the rules
    chars = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000]
    for ours, theirs in [(T._rules.alpha, ALPHA), (T._rules.lower, ALPHA_LOWER), (T._rules.upper, ALPHA_UPPER)]:
        a, b = re.compile(ours).match, re.compile(f"[{theirs}]").match
        assert [c for c in chars if bool(a(c)) != bool(b(c))] == []


def test_words_without_spacy():
    assert T.words("Don't stop, Mr. Smith: it's 5km (e.g. U.S.)... #1!") == [
        "Do", "n't", "stop", ",", "Mr.", "Smith", ":", "it", "'s", "5", "km", "(", "e.g.", "U.S.", ")", "...", "#", "1",
        "!"]
    assert T.words("def f(x):\n    return x[:]") == ["def", "f(x", "):", "return", "x", "[:", "]"]
    assert T.words("see https://example.com/a/b, well-known") == ["see", "https://example.com/a/b", ",", "well", "-",
                                                                   "known"]
    assert T.sentences("It rains. It pours!  Really?") == ["It rains.", " It pours!", "  Really?"]
    assert T.count_sentences("Dr. Who met Mr. Smith. They talked.") == 2


def test_ngram_statistics_match_datatrove_s_helpers():
    pytest.importorskip("datatrove")
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams

    rng = random.Random(11)
    vocab = ["a", "b", "ab", "c", "bc", "abc", "the", "cat", ".", ",", "(", ")"]
    for _ in range(600):
        text = " ".join(rng.choice(vocab[:rng.randint(2, len(vocab))]) for _ in range(rng.randint(0, 60)))
        words = T.words(text)
        for grams in (T.NGrams(text), T.FewNGrams(text)):
            assert grams.n_words == len(words)
            assert grams.any_repeated(range(5, 11)) == any(find_all_duplicate(words, n) for n in range(5, 11))
            for n in range(1, 11):
                assert grams.top_chars(n) == (find_top_duplicate(get_n_grams(words, n)) if len(words) >= n else 0)
                assert grams.repeated_chars(n) == find_all_duplicate(words, n)


# ---- each rule on a small text ----------------------------------------------------------------

PROSE = ("The history of the town goes back to a small market that was held near the river crossing. Over the "
         "centuries the market grew into a trading post, and by the end of the eighteenth century the town had a "
         "bridge, a school and a church with a tall tower that can be seen from the hills around the valley.")
HASHTAGS = " #news #town #river #bridge #valley #history #market #church #fish #bread #hills #tower"
UNIQUE = " ".join(f"{w}{i}" for i, w in enumerate(["word", "term", "item", "name", "unit"] * 20))


def test_gopher_quality_rules():
    g = GopherQuality()
    check(g, PROSE, None)
    check(g, "A short note.", "gopher_short_doc")
    check(GopherQuality(max_doc_words=20), PROSE, "gopher_long_doc")
    check(g, " ".join(["to be or we go on as it is up"] * 8), "gopher_below_avg_threshold")
    check(g, " ".join(["internationalization characterization the of"] * 13), "gopher_above_avg_threshold")
    check(g, PROSE + HASHTAGS, "gopher_too_many_hashes")
    check(g, PROSE.replace(",", "...").replace(" a ", " ... a ... "), "gopher_too_many_ellipsis")
    check(g, "\n".join("- " + s for s in PROSE.split(", ")), "gopher_too_many_bullets")
    lines = PROSE.split(". ")
    ending = "\n".join(line + ("..." if i % 2 else ".") for i, line in enumerate(lines))
    check(g, ending, "gopher_too_many_end_ellipsis")
    check(g, PROSE + " " + " ".join(str(1000 + i) for i in range(20)), "gopher_below_alpha_threshold")
    check(g, re.sub(r"\b(the|be|to|of|and|that|have|with)\b", "x", PROSE, flags=re.I), "gopher_enough_stop_words")
    check(g, PROSE.replace("the", "The"), None)  # "the" is still there once, with "of" and "and"
    only_capitalised = re.sub(r"\b(the|be|to|of|and|that|have|with)\b", lambda m: m.group().upper(), PROSE)
    check(g, only_capitalised, "gopher_enough_stop_words")  # the stop words are case-sensitive
    check(GopherQuality(stop_words=["town", "river"]), only_capitalised, None)


@pytest.mark.parametrize("param, text", [
    ("min_doc_words", "A short note about the town and the river."),
    ("min_avg_word_length", " ".join(["to be or we go on as it is up"] * 8)),
    ("max_avg_word_length", " ".join(["internationalization characterization the of"] * 13)),
    ("max_symbol_word_ratio", PROSE + HASHTAGS),
    ("max_bullet_lines_ratio", "\n".join("- " + s for s in PROSE.split(", "))),
    ("max_non_alpha_words_ratio", PROSE + " " + " ".join(str(1000 + i) for i in range(20))),
    ("min_stop_words", re.sub(r"\b(the|be|to|of|and|that|have|with)\b", "x", PROSE, flags=re.I)),
])
def test_gopher_quality_none_turns_a_rule_off(param, text):
    assert run(GopherQuality(), text)[0] is not None
    check(GopherQuality(**{param: None}), text, None)


def test_gopher_quality_without_words():
    assert run(GopherQuality(), "")[0] == "gopher_short_doc"
    assert run(GopherQuality(min_doc_words=None), "  \n ")[0] == "gopher_enough_stop_words"  # datatrove: 1/0
    assert run(GopherQuality(min_doc_words=None, min_stop_words=None), " \n\n ")[0] is None


def test_gopher_repetition_rules():
    g = GopherRepetition()
    check(g, PROSE, None)
    check(g, "", "empty")
    check(g, "\n\n".join(["The same paragraph again."] * 3 + ["Something else entirely, for once."]), "dup_para_frac")
    long_para = PROSE
    paras = [long_para, "One.", "Two.", "Three.", "Four.", "Five.", "Six.", long_para]
    check(g, "\n\n".join(paras), "dup_para_char_frac")
    check(g, "\n".join(["The same line again."] * 3 + ["Something else entirely, for once."]), "dup_line_frac")
    check(g, "\n".join([long_para, "One.", "Two.", "Three.", "Four.", "Five.", "Six.", long_para]),
          "dup_line_char_frac")
    check(g, " ".join(f"alpha beta {w}" for w in UNIQUE.split()[:40]), "top_2_gram")
    check(g, "ab cd ef " * 20 + UNIQUE, "top_3_gram")
    check(g, "rho sig tau ups " * 14 + UNIQUE, "top_4_gram")
    words = UNIQUE.split()
    check(g, " ".join(words + words[:30]), "duplicated_5_n_grams")
    check(GopherRepetition(dup_n_grams=((5, 0.5), (10, 0.01))), " ".join(words + words[:30]), "duplicated_10_n_grams")


@pytest.mark.parametrize("param, text", [
    ("dup_para_frac", "\n\n".join(["Same paragraph."] * 3 + ["Something else entirely, for once, here."])),
    ("dup_line_frac", "\n".join(["Same line."] * 3 + ["Something else entirely, for once, here."])),
])
def test_gopher_repetition_none_turns_a_rule_off(param, text):
    first = run(GopherRepetition(), text)[0]
    assert first == param
    assert run(GopherRepetition(**{param: None}), text)[0] != param


def test_gopher_repetition_n_gram_rules_from_a_recipe():
    words = UNIQUE.split()
    text = " ".join(words + words[:30])
    assert GopherRepetition(top_n_grams=[[2, 0.2]], dup_n_grams=[[5, 0.15]]).dup_n_grams == ((5, 0.15),)
    assert run(GopherRepetition(dup_n_grams=None), text)[0] is None
    assert run(GopherRepetition(top_n_grams=[], dup_n_grams=[]), "a b " * 40)[0] is None


C4_PAGE = "\n".join([
    "Home | About | Contact",  # no terminal punctuation
    "The town lies on the river, at the foot of the hills.",
    "Please enable JavaScript to view the map of the town.",
    "Its market is held every Saturday morning. It sells fish and bread.",
    "Read our privacy policy.",
    "Short line.",
    "The bridge was built in 1820.[1] It replaced a ferry.[citation needed]",
    "Wait for it...",
    "A line with a " + "x" * 1001 + " word.",
    "Visitors come for the old church and the tower.",
])


def test_c4_quality_rules_and_kept_text():
    c4 = C4Quality()
    reason, kept = run(c4, C4_PAGE)
    assert reason is None
    assert kept == "\n".join([
        "The town lies on the river, at the foot of the hills.",
        "Its market is held every Saturday morning. It sells fish and bread.",
        "The bridge was built in 1820. It replaced a ferry.",
        "Visitors come for the old church and the tower.",
    ])
    check(c4, C4_PAGE, None)
    check(c4, "The town lies on the river. It is old.", "too_few_sentences")
    check(c4, C4_PAGE + "\nLorem ipsum dolor sit amet, consectetur.", "lorem_ipsum")
    check(c4, C4_PAGE + "\nSet the {name} field before you start.", "curly_bracket")
    check(c4, "Lorem ipsum dolor sit amet", "too_few_sentences")  # no terminal punctuation: never looked at
    assert run(C4Quality(filter_lorem_ipsum=False), C4_PAGE + "\nLorem ipsum dolor sit amet, consectetur.")[0] is None
    assert run(C4Quality(filter_curly_bracket=False), C4_PAGE + "\nSet the {name} field first.")[0] is None
    assert run(C4Quality(min_num_sentences=-1), "Nothing here")[0] is None
    assert run(C4Quality(min_num_sentences=-1), "Nothing here")[1] == ""
    loose = C4Quality(filter_no_terminal_punct=False, filter_javascript=False, filter_policy=False,
                      remove_citations=False, max_word_length=-1, min_words_per_line=-1)
    reason, kept = run(loose, C4_PAGE)
    assert reason is None and kept == C4_PAGE


def test_c4_quality_by_sentences():
    c4 = C4Quality(split_paragraph=False)
    text = "The town is old. Its bridge is older! Who built it? Nobody really knows. The records burned. Sad."
    reason, kept = run(c4, text)
    assert reason is None
    assert kept == "The town is old. Its bridge is older! Who built it? Nobody really knows. The records burned."
    check(c4, text, None)
    check(c4, "Too few. Sentences here.", "too_few_sentences")


def test_fineweb_quality_rules():
    f = FineWebQuality()
    check(f, PROSE, None)
    check(f, " \n\n \n", "empty")
    check(f, "\n".join(["A line that ends with a period."] + [f"Line {i} of a list" for i in range(9)]),
          "line_punct_ratio")
    zero = "\n".join(f"A rather long line number {i} without a final mark" for i in range(9))
    check(f, zero, "line_punct_ratio")
    check(FineWebQuality(line_punct_exclude_zero=True), zero, None)
    check(f, "\n".join([PROSE] + [f"Item {i}." for i in range(3)]), "short_line_ratio")
    check(f, "\n".join([PROSE, "A line that comes twice in this text.", "A line that comes twice in this text."]),
          "char_dup_ratio")
    long_words = ["Supercalifragilistic", "antidisestablishmentarian", "floccinaucinihilipilification",
                  "pneumonoultramicroscopic", "hippopotomonstrosesquipedalian", "incomprehensibilities"]
    lines = [f"{a}{i}{b}." for i, (a, b) in enumerate(zip(long_words, long_words[1:] + long_words[:1]))]
    check(f, "\n".join(lines), "list_ratio")
    check(FineWebQuality(new_line_ratio=1.0), "\n".join(lines), None)
    check(FineWebQuality(stop_chars=("!",)), "\n".join([PROSE, PROSE.replace(".", "!")[:-1] + "?"]), "line_punct_ratio")


# ---- parameters, errors, pickling ---------------------------------------------------------------


def test_datatrove_s_parameter_names_and_defaults():
    dt = pytest.importorskip("datatrove.pipeline.filters")
    import inspect

    left_out = {"self", "exclusion_writer", "language"}
    for cls, twin in [(GopherQuality, dt.GopherQualityFilter), (GopherRepetition, dt.GopherRepetitionFilter),
                      (C4Quality, dt.C4QualityFilter), (FineWebQuality, dt.FineWebQualityFilter)]:
        theirs = {k: p.default for k, p in inspect.signature(twin.__init__).parameters.items() if k not in left_out}
        ours = {f.name: f.default for f in dataclasses.fields(cls)}
        assert ours == theirs, cls.name


@pytest.mark.parametrize("make", [
    lambda: GopherQuality(min_doc_words=-1),
    lambda: GopherQuality(max_avg_word_length=2.5),
    lambda: GopherQuality(max_bullet_lines_ratio="high"),
    lambda: GopherQuality(stop_words="the"),
    lambda: GopherRepetition(dup_line_frac=-0.1),
    lambda: GopherRepetition(top_n_grams=[[0, 0.1]]),
    lambda: GopherRepetition(dup_n_grams=[5, 0.1]),
    lambda: C4Quality(min_num_sentences=-2),
    lambda: C4Quality(split_paragraph="yes"),
    lambda: C4Quality(max_word_length=None),
    lambda: FineWebQuality(line_punct_thr=None),
    lambda: FineWebQuality(short_line_length=2.5),
    lambda: FineWebQuality(stop_chars=["."] + [""]),
])
def test_impossible_parameters_are_one_line_errors(make):
    with pytest.raises(HerdError) as e:
        make()
    assert "\n" not in str(e.value) and "expected" in str(e.value)


@pytest.mark.parametrize("stage", [GopherQuality(min_doc_words=10, stop_words=["town"]),
                                   GopherRepetition(top_n_grams=[[2, 0.3]]), C4Quality(min_num_sentences=2),
                                   FineWebQuality(stop_chars=(".", "!"))])
def test_a_stage_pickles(stage):
    copy = pickle.loads(pickle.dumps(stage))
    assert copy == stage and type(copy) is type(stage)
    for text in [PROSE, C4_PAGE, "a b " * 40 + UNIQUE, ""]:
        assert run(copy, text) == run(stage, text)
