"""Llama Guard: the prompt byte for byte as Meta's reference code renders it (Guard 2 and 3), custom taxonomies,
reading a guard's answer, a guard model's score and verdict, and training a guard with the post-training stack."""

import io
import json

import pytest

from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.safety import guard_prompt
from llamaherd.safety.guard import GUARD2, GUARD3, Category, load_categories, parse_verdict

ref = pytest.importorskip("llama_cookbook.inference.prompt_format_utils",
                          reason="llama-cookbook (installed without its dependencies by `make dev`)")

CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "Wie backe ich Brot? 🍞\nSchritt für Schritt, bitte."},
     {"role": "assistant", "content": "Mix flour, water, salt and yeast.\n\nThen knead it: 10 minutes; $5 of flour."}],
    [{"role": "user", "content": "パンの作り方は?"}, {"role": "assistant", "content": "  Knead, rest, bake.  "},
     {"role": "user", "content": "And {braces}, $dollars, ${template} and\ttabs?\n"}],
]


def reference(messages, version, categories=None, with_policy=False):
    turns = ref.create_conversation([m["content"] for m in messages])
    agent = ref.AgentType.USER if len(messages) % 2 else ref.AgentType.AGENT
    v = {2: ref.LlamaGuardVersion.LLAMA_GUARD_2, 3: ref.LlamaGuardVersion.LLAMA_GUARD_3}[version]
    if categories is None and not with_policy:
        return ref.build_default_prompt(agent, turns, v)
    cats = categories or (ref.LLAMA_GUARD_2_CATEGORY if version == 2 else ref.LLAMA_GUARD_3_CATEGORY)
    template = ref.PROMPT_TEMPLATE_2 if version == 2 else ref.PROMPT_TEMPLATE_3
    return ref.build_custom_prompt(agent, turns, [ref.SafetyCategory(c.name, c.description) for c in cats]
                                   if categories else cats, "S", template, with_policy)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_the_prompt_is_byte_identical_to_meta_s_build_default_prompt(version, turns):
    """Must show 1: 1-, 2- and 3-turn conversations (Unicode, blank lines, tabs, template-like text): the same
    string as llama-cookbook's build_default_prompt; with each category's description (with_policy) the same
    as its build_custom_prompt."""
    messages = CONVERSATIONS[turns - 1]
    assert guard_prompt(messages, version=version) == reference(messages, version)
    assert guard_prompt(messages, version=version, with_policy=True) == reference(messages, version,
                                                                                  with_policy=True)


def test_the_taxonomies_are_meta_s():
    assert [c.name for c in GUARD2] == [c.name for c in ref.LLAMA_GUARD_2_CATEGORY]
    assert [c.name.strip() for c in GUARD2][:3] == ["Violent Crimes.", "Non-Violent Crimes.", "Sex Crimes."]
    assert len(GUARD2) == 11 and len(GUARD3) == 14
    assert [(c.name, c.description) for c in GUARD3] == [(c.name, c.description) for c in ref.LLAMA_GUARD_3_CATEGORY]
    prompt = guard_prompt(CONVERSATIONS[0])
    assert "S1: Violent Crimes. \nS2: Non-Violent Crimes. \n" in prompt and "S11: Sexual Content. \n<END" in prompt
    assert prompt.startswith("[INST] Task: Check if there is unsafe content in 'User' messages")
    assert guard_prompt(CONVERSATIONS[1], version=3).endswith("<|start_header_id|>assistant<|end_header_id|>")
    assert "ONLY THE LAST Agent message" in guard_prompt(CONVERSATIONS[1])


def test_a_custom_taxonomy_replaces_the_default(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[category]]\nname = "Fruit."\ndescription = "Mentions of fruit."\n\n'
                    '[[category]]\nname = "Spoilers."\ndescription = """Plot twists\n - of films"""\n')
    cats = load_categories(path)
    assert cats == [Category("Fruit.", "Mentions of fruit."), Category("Spoilers.", "Plot twists\n - of films")]
    for version in (2, 3):
        for with_policy in (False, True):
            got = guard_prompt(CONVERSATIONS[1], version, cats, with_policy)
            assert got == reference(CONVERSATIONS[1], version, cats, with_policy)
    assert "S1: Fruit.\nS2: Spoilers.\n<END UNSAFE" in guard_prompt(CONVERSATIONS[0], 2, cats)
    assert guard_prompt(CONVERSATIONS[0], 3, str(path)) == guard_prompt(CONVERSATIONS[0], 3, cats)  # a TOML path
    assert "S1: Fruit.\nMentions of fruit.\nS2: Spoilers.\nPlot twists\n - of films\n<END" in guard_prompt(
        CONVERSATIONS[0], 2, cats, with_policy=True)
    path.write_text("[[category]]\ndescription = 'no name'\n")
    with pytest.raises(HerdError, match="category 1: expected a non-empty string name"):
        load_categories(path)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"), ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: role 'user', expected"),
    ([{"role": "system", "content": "a"}], "message 0: role 'system'"), ([{"role": "user"}], "string content"),
])
def test_bad_conversations_are_one_line_errors(messages, message):
    with pytest.raises(HerdError, match=message):
        guard_prompt(messages)
    with pytest.raises(HerdError, match="guard version 4"):
        guard_prompt(CONVERSATIONS[0], version=4)


def test_herd_guard_prompt_prints_exactly_the_prompt(tmp_path, capsys, monkeypatch):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CONVERSATIONS[2], ensure_ascii=False))
    assert main(["guard", "prompt", "--conversation", str(path)]) == 0
    assert capsys.readouterr().out == reference(CONVERSATIONS[2], 2)  # no trailing newline
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(CONVERSATIONS[1])))
    assert main(["guard", "prompt", "--conversation", "-", "--guard-version", "3", "--with-policy"]) == 0
    assert capsys.readouterr().out == reference(CONVERSATIONS[1], 3, with_policy=True)
    path.write_text("[{")
    assert main(["guard", "prompt", "--conversation", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("output, verdict, categories", [
    ("safe", "safe", []), ("\n\nsafe\n", "safe", []), ("unsafe\nS1", "unsafe", ["S1"]),
    ("unsafe\nS2,S10", "unsafe", ["S2", "S10"]), ("unsafe", "unsafe", []), ("unsafe\nS12", "malformed", []),
    ("maybe?", "malformed", []), ("", "malformed", []), ("safe\nS1", "malformed", []),
    ("unsafe\nS1\nmore", "malformed", []),
])
def test_a_guard_s_answer_is_read_or_reported_malformed(output, verdict, categories):
    got = parse_verdict(output, 11)
    assert (got.verdict, got.categories, got.output) == (verdict, categories, output)


WORDS = "the a big small red blue dog cat house car tree road sky sea book pen cup hat lamp door".split()
FRUIT = "apple banana cherry".split()


def fruit_text(rng, fruit: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
    if fruit:
        words[rng.randrange(len(words))] = rng.choice(FRUIT)
    return " ".join(words)


def fruit_conversation(rng, unsafe: bool, turns: int = 1) -> list[dict]:
    """A user prompt, or a user prompt (with or without fruit) and a reply: unsafe when the last mentions fruit."""
    if turns == 1:
        return [{"role": "user", "content": fruit_text(rng, unsafe)}]
    return [{"role": "user", "content": fruit_text(rng, rng.random() < 0.5)},
            {"role": "assistant", "content": fruit_text(rng, unsafe)}]


@pytest.fixture(scope="module")
def fruit_guard(tmp_path_factory):
    """A guard for a custom one-category taxonomy (S1: mentions of fruit), trained by `herd guard train` from a
    tiny random model on 800 labelled conversations (user prompts, and replies after a prompt that may mention
    fruit itself): a rule a small model learns, so the guard's decisions can be checked."""
    import random

    import torch
    from conftest import tiny_model_args

    import llamaherd
    from llamaherd.model.transformer import Transformer
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.tokenizer.train import train_bpe

    root = tmp_path_factory.mktemp("guard")
    rng = random.Random(0)
    records = []
    for i in range(800):
        unsafe = i % 2 == 0
        records.append({"messages": fruit_conversation(rng, unsafe, rng.choice((1, 2))),
                        "label": "unsafe" if unsafe else "safe",
                        "categories": ["S1"] if unsafe else []})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "fruit.toml").write_text('[[category]]\nname = "Fruit."\ndescription = "Mentions of fruit."\n')
    cats = load_categories(root / "fruit.toml")
    texts = [guard_prompt(r["messages"], 2, cats) + a for r in records[:100] for a in ("safe", "unsafe\nS1")]
    tok = Tokenizer.from_ranks(train_bpe(texts * 5, vocab_size=600, progress=False))
    torch.manual_seed(0)
    model = Transformer(tiny_model_args(vocab_size=tok.n_words, max_seq_len=256))
    model.init_weights(seed=0)
    llamaherd.save(model, root / "base", tokenizer=tok)
    assert main(["guard", "train", str(root / "base"), "--data", str(root / "data.jsonl"), "--categories",
                 str(root / "fruit.toml"), "--out", str(root / "guard"), "--no-progress", "train.steps=250",
                 "train.batch_size=8", "train.seq_len=256", "train.lr=3e-3", "train.warmup_steps=10",
                 "train.eval_every=0", "checkpoint.every=1000", "train.device=cpu"]) == 0
    return root


def test_herd_guard_train_teaches_a_guard_its_taxonomy(fruit_guard):
    """The post-training stack trains the guard prompt's answer: held-out accuracy from chance to (nearly) all;
    the prompt's version and taxonomy are kept beside the guard."""
    result = json.loads((fruit_guard / "guard" / "guard_result.json").read_text())
    assert result["heldout"] == 80 and result["examples"] == 720
    assert result["base_heldout_accuracy"] <= 0.7 and result["heldout_accuracy"] >= 0.95
    kept = json.loads((fruit_guard / "guard" / "guard.json").read_text())
    assert kept == {"version": 2, "categories": [{"name": "Fruit.", "description": "Mentions of fruit."}]}


def test_herd_guard_gives_the_verdict_categories_and_score(fruit_guard, tmp_path, capsys):
    """`herd guard`: unsafe with its category and a score near 1 for a conversation that breaks the policy,
    safe and a score near 0 for one that does not; the verdict is the score against --threshold."""
    import random

    from llamaherd.safety.guard import Guard

    rng = random.Random(123)  # conversations the guard has not seen
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps(fruit_conversation(rng, True)))
    good.write_text(json.dumps(fruit_conversation(rng, False)))
    got = {}
    for name, path in (("bad", bad), ("good", good)):
        assert main(["guard", str(fruit_guard / "guard"), "--conversation", str(path), "--json",
                     "--device", "cpu"]) == 0
        got[name] = json.loads(capsys.readouterr().out)
    assert got["bad"]["verdict"] == "unsafe" and got["bad"]["categories"] == ["S1"] and got["bad"]["score"] > 0.8
    assert got["good"]["verdict"] == "safe" and got["good"]["categories"] == [] and got["good"]["score"] < 0.2
    assert not got["bad"]["malformed"] and got["bad"]["output"].strip() == "unsafe\nS1"
    assert main(["guard", str(fruit_guard / "guard"), "--conversation", str(bad), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("unsafe  S1 (Fruit)\nscore ")
    messages = json.loads(bad.read_text())
    score = got["bad"]["score"]
    strict = Guard(fruit_guard / "guard", categories=load_categories(fruit_guard / "fruit.toml"),
                   threshold=min(1.0, score + 1e-6), device="cpu")
    lenient = Guard(fruit_guard / "guard", categories=load_categories(fruit_guard / "fruit.toml"),
                    threshold=max(0.0, score - 1e-6), device="cpu")
    assert strict.classify(messages)["score"] == pytest.approx(score, abs=1e-6)
    assert lenient.classify(messages)["verdict"] == "unsafe"
    assert strict.classify(messages)["verdict"] == ("unsafe" if score >= min(1.0, score + 1e-6) else "safe")


def test_a_garbled_answer_is_reported_not_raised(fruit_guard, tmp_path, capsys):
    """A model that is no guard (the untrained base) answers nonsense: reported as malformed, with its score."""
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user", "content": "a red apple"}]))
    assert main(["guard", str(fruit_guard / "base"), "--conversation", str(path), "--categories",
                 str(fruit_guard / "fruit.toml"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["malformed"] and 0 <= result["score"] <= 1 and result["verdict"] in ("safe", "unsafe")
    assert main(["guard", str(fruit_guard / "base"), "--conversation", str(path), "--threshold", "2"]) == 2
    assert "threshold 2.0: expected a probability" in capsys.readouterr().err


def test_guard_3_reads_the_answer_after_the_assistant_header_s_blank_line(fruit_guard):
    from llamaherd.safety.guard import Guard

    guard = Guard(fruit_guard / "guard", version=3, device="cpu")
    ids = guard.prompt_ids([{"role": "user", "content": "hi"}])
    text = guard.tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|> Task:")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and ids.count(guard.tokenizer.bos_id) == 1


def replying_model(tok, reply: str):
    """A served model that answers every chat with ``reply``: a bigram model made by hand (the blocks add
    nothing; each token of the chain header -> reply -> <|eot_id|> has its own embedding direction, which the
    output layer maps to the next one)."""
    import torch
    from conftest import tiny_model_args

    from llamaherd.model.transformer import Transformer

    model = Transformer(tiny_model_args(vocab_size=tok.n_words, max_seq_len=256))
    chain = [tok.encode("\n\n", bos=False)[-1], *tok.encode(reply, bos=False), tok.eot_id]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.zero_()
        for k, (a, b) in enumerate(zip(chain, chain[1:])):
            model.tok_embeddings.weight[a] = torch.nn.functional.one_hot(torch.tensor(k), model.args.dim).float()
            model.output.weight[b, k] = 10.0
    return model.eval()


def test_a_guarded_server_refuses_flagged_prompts_and_filters_flagged_replies(fruit_guard):
    """Must show 4, through the official openai client against `herd serve`'s app on loopback: with the guard on
    input and output, a prompt that breaks the policy is refused (finish_reason content_filter, the category
    and score in the response); a reply that breaks it is filtered, streamed or not, and none of its text
    reaches the client; a safe exchange passes; /metrics counts the checks. Without the output check the same
    reply comes through: the filter is what removes it."""
    import urllib.request

    import openai

    from llamaherd.checkpoint import load
    from llamaherd.serve.app import guardrails_for, running_server

    _, tok = load(fruit_guard / "guard", device="cpu")
    fruity, plain = replying_model(tok, "a red apple"), replying_model(tok, "the big dog")
    dangerous = [{"role": "user", "content": "the banana cup"}]
    harmless = [{"role": "user", "content": "the red dog"}]

    def ask(client, messages, stream=False):
        if not stream:
            choice = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8).choices[0]
            return choice.message.content, choice.finish_reason, choice.model_extra.get("content_filter")
        text, finish, found = "", None, None
        for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True):
            c = chunk.choices[0]
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            found = (c.model_extra or {}).get("content_filter") or found
        return text, finish, found

    guard = guardrails_for(str(fruit_guard / "guard"), device="cpu")
    with running_server(fruity, tok, "tiny", kv_blocks=64, block_size=8, guardrails=guard) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        for stream in (False, True):
            text, finish, found = ask(client, dangerous, stream)
            assert (text, finish) == ("", "content_filter")
            assert found["stage"] == "input" and found["guard"]["categories"] == ["S1"]
            assert found["guard"]["score"] >= 0.5
            text, finish, found = ask(client, harmless, stream)  # the reply mentions an apple
            assert "apple" not in text and finish == "content_filter"
            assert found["stage"] == "output" and found["guard"]["categories"] == ["S1"]
        with pytest.raises(openai.BadRequestError, match="the guard reads at most"):  # too long to moderate
            ask(client, [{"role": "user", "content": "the red dog " * 65}])
        completion = client.completions.create(model="tiny", prompt="the cherry hat", max_tokens=4).choices[0]
        assert completion.finish_reason == "content_filter" and completion.text == ""
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        assert 'herd_guard_checks_total{stage="input",verdict="unsafe"} 3.0' in metrics
        assert 'herd_guard_checks_total{stage="output",verdict="unsafe"} 2.0' in metrics
        assert "herd_guard_batches_total" in metrics
    with running_server(plain, tok, "tiny", kv_blocks=64, block_size=8, guardrails=guard) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        for stream in (False, True):
            assert ask(client, harmless, stream)[:2] == ("the big dog", "stop")
    only_input = guardrails_for(str(fruit_guard / "guard"), on=("input",), device="cpu")
    with running_server(fruity, tok, "tiny", kv_blocks=64, block_size=8, guardrails=only_input) as (url, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        assert ask(client, harmless)[:2] == ("a red apple", "stop")
        assert ask(client, harmless, stream=True)[:2] == ("a red apple", "stop")
