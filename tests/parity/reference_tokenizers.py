"""Tokenizer references: token ids and decoded text from Hugging Face `transformers` (which runs
the `tokenizers` library) for the tiny sentencepiece model, the same tokenizer as transformers 5
saves it (a sentencepiece-style tokenizer.json without tokenizer.model), and three byte-level BPE
tokenizers trained here on tests/fixtures/tiny_corpus.txt in the shapes of Llama 3, Qwen2 and
GPT-2, and the Llama 3 one with added tokens (single_word, lstrip/rstrip) beside many characters;
and copies whose tokenizer_config.json disagrees with tokenizer.json (CONFIG_VARIANTS).

Output (out = <build>/parity/tokenizers/):
  <name>/                 the trained tokenizer folders (tokenizer.json, tokenizer_config.json,
                          generation_config.json), loaded by lorad's LoadTokenizer
  <name>.json             {"folder", "vocab_size", "bos_id", "eos_ids",
                           "cases": [{"text", "ids", "ids_no_special", "decode", "decode_skip"}],
                           "random_ids": [{"ids", "decode", "decode_skip"}],
                           "stream": [{"text", "ids", "decode"}]}
"""
import json
import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE.parent / "fixtures" / "tiny_corpus.txt"

# The pre-tokenizer regexes as the families publish them in tokenizer.json.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                  "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text every tokenizer must get right: scripts, emoji sequences, whitespace shapes, digits,
# contractions, code, and special tokens inside text. {S0}, {S1}, {S2} are replaced by the
# tokenizer's own special tokens.
CASES = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  two leading spaces and two trailing  ",
    "many     spaces   between",
    "tabs\tand\t\ttabs \t mixed",
    "line one\nline two\n",
    "windows\r\nline\r\nendings\r\n\r\n",
    "blank\n\n\nlines\n \n  \nend",
    "\n\nleading newlines",
    "digits 1234567890 3.14159 2024-01-31 007 1,000,000",
    "I'm sure you'll see it. DON'T stop! She's here, we've been, they'd go, I'LL win.",
    "contraction's edge 's 'S 'Re",
    "def f(x):\n    return x ** 2  # square\n\n\tif (a && b) { c[i] = \"s\"; }\n",
    "Grüße aus München! Straße, Äpfel, Öl und übermäßig viel Käse.",
    "Ça va très bien : l'élève est à l'école — où êtes-vous ?",
    "Привет, как дела? Съешь же ещё этих мягких французских булок.",
    "日本語のテキストです。東京は晴れ、富士山が見える。",
    "我爱北京天安门，你好世界！这是一个测试。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Emoji: 😀 🚀 ❤️ 👍🏽 👩🏿‍🔬 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪 done",
    "mixed 日本 and English and Русский 123 😀x",
    "nbsp\u00a0here\u3000ideographic\u2003em-space",
    "combining e\u0301 vs \u00e9 and ﬁ ligature",
    "{S0}system\nYou are helpful.{S1}\n{S0}user\nHi there!{S1}\n",
    "text before {S0} inside {S2}after",
    "{S2}{S2} twice and {S1}",
    "not special: <|im_start |> <| <s x> [INST]",
]

# Pieces for random strings streamed through the incremental detokenizer.
RANDOM_PIECES = ["a", "the", " ", "  ", "\n", "\t", "ü", "ß", "é", "Ж", "я", "日", "本", "語",
                 "中", "文", "😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "ع", "ب", "1", "42", "'s", "!",
                 "?", "—", "…", "€", "\u00a0", "x", "Hello", "world"]


def _train_bpe(name, out, pre_tokenizer, normalizer, special, post_processor, extra_text,
               ignore_merges, string_merges, config, generation_config):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The test text joins the corpus so merges exist inside multi-byte characters too (tokens
    # that hold part of a UTF-8 sequence are what the incremental detokenizer must hold back).
    lines = CORPUS.read_text(encoding="utf-8").splitlines() + extra_text
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = post_processor
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if string_merges:  # Llama 3's published tokenizer.json writes merges as "a b" strings
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                               encoding="utf-8")
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for s in special}
    config = dict(config, added_tokens_decoder=added)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2),
                                                   encoding="utf-8")
    return folder


def _fixtures(out):
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    extra = [c for c in CASES if "{S" not in c] + RANDOM_PIECES
    llama3 = _train_bpe(
        "llama3_bpe", out,
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]),
        None, LLAMA3_SPECIAL,
        processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", 0)]),
        ]),
        extra, ignore_merges=True, string_merges=True,
        config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                "model_input_names": ["input_ids", "attention_mask"],
                "model_max_length": 131072},
        generation_config={"bos_token_id": 0, "eos_token_id": [1, 8, 9]})
    qwen2 = _train_bpe(
        "qwen2_bpe", out,
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]),
        normalizers.NFC(), QWEN2_SPECIAL, processors.ByteLevel(trim_offsets=False),
        extra, ignore_merges=False, string_merges=False,
        config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                "errors": "replace", "split_special_tokens": False,
                "model_max_length": 32768},
        generation_config={"bos_token_id": 0, "eos_token_id": [2, 0]})
    gpt2 = _train_bpe(
        "gpt2_bpe", out,
        pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]),
        None, QWEN2_SPECIAL, processors.ByteLevel(trim_offsets=True),
        extra, ignore_merges=False, string_merges=False,
        config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "clean_up_tokenization_spaces": False, "model_max_length": 2048},
        generation_config={"bos_token_id": 0, "eos_token_id": 0})
    return {"llama3_bpe": (llama3, "<|start_header_id|>", "<|eot_id|>", "<|begin_of_text|>"),
            "qwen2_bpe": (qwen2, "<|im_start|>", "<|im_end|>", "<|endoftext|>"),
            "gpt2_bpe": (gpt2, "<|im_start|>", "<|im_end|>", "<|endoftext|>")}


# Characters beside added tokens: single_word tokens match only between non-word characters
# (alphanumerics and '_' are word characters, in any script), lstrip/rstrip ones take the white
# space around them.
NEIGHBOURS = ["", " ", "a", "é", "日", "。", "—", "\u00a0", "\u3000", "_", "1", "٣", "😀", "\n", "-",
              "ß", "\u0301", "\u2003", "\u200b", "ǅ", "Ⅻ", "½"]


def _with_added_tokens(out, llama3):
    """The Llama 3-shaped tokenizer with added tokens of each kind: single_word (special and not,
    normalized and not) and lstrip/rstrip; and the texts that put every neighbour beside them."""
    import shutil

    folder = out / "llama3_added"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(llama3, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    n = max([t["id"] for t in data["added_tokens"]] + list(data["model"]["vocab"].values())) + 1
    added = [("<tool>", True, False, False, True), ("<ls>", False, True, True, True),
             ("word", True, False, False, False)]
    for i, (content, single_word, lstrip, rstrip, special) in enumerate(added):
        data["added_tokens"].append({"id": n + i, "content": content, "single_word": single_word,
                                     "lstrip": lstrip, "rstrip": rstrip,
                                     "normalized": not special, "special": special})
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    texts = [a + content + b for a in NEIGHBOURS for b in NEIGHBOURS for content, *_ in added]
    return folder, texts


def _eos_ids(tok, folder):
    from transformers import GenerationConfig

    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if (folder / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids)


def _references(folder, specials, extra_cases=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    rng = random.Random(20240531)
    cases = []
    for c in CASES + list(extra_cases):
        text = c.replace("{S0}", specials[0]).replace("{S1}", specials[1]).replace("{S2}", specials[2])
        ids = tok(text, add_special_tokens=True).input_ids
        cases.append({
            "text": text, "ids": ids,
            "ids_no_special": tok(text, add_special_tokens=False).input_ids,
            "decode": tok.decode(ids, skip_special_tokens=False),
            "decode_skip": tok.decode(ids, skip_special_tokens=True)})
    # Arbitrary id sequences: Decode must follow HF for invalid UTF-8 and special tokens too.
    n = len(tok)
    random_ids = []
    for _ in range(40):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 12))]
        random_ids.append({"ids": ids, "decode": tok.decode(ids, skip_special_tokens=False),
                           "decode_skip": tok.decode(ids, skip_special_tokens=True)})
    stream = []
    for _ in range(60):
        text = "".join(rng.choice(RANDOM_PIECES) for _ in range(rng.randrange(1, 25)))
        ids = tok(text, add_special_tokens=False).input_ids
        stream.append({"text": text, "ids": ids,
                       "decode": tok.decode(ids, skip_special_tokens=True)})
    return {"folder": str(folder.resolve()), "vocab_size": len(tok), "bos_id": tok.bos_token_id,
            "eos_ids": _eos_ids(tok, folder), "cases": cases, "random_ids": random_ids,
            "stream": stream}


def _resaved_by_transformers(out, model):
    """The tiny model's tokenizer saved again by transformers 5, as users' Llama 2 / Mistral
    folders are: a sentencepiece-style tokenizer.json (Metaspace, byte fallback) and no
    tokenizer.model."""
    import shutil

    from transformers import AutoTokenizer

    folder = out / "sentencepiece_json"
    shutil.rmtree(folder, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(model)).save_pretrained(str(folder))
    (folder / "tokenizer.model").unlink(missing_ok=True)
    shutil.copy(model / "generation_config.json", folder / "generation_config.json")
    return folder


# tokenizer_config.json fields that disagree with tokenizer.json, as in folders users edit by
# hand: transformers 5 ignores add_bos_token / add_eos_token whenever tokenizer.json exists (its
# post_processor rules), while LlamaTokenizer rebuilds its pre-tokenizer from legacy and
# add_prefix_space.
CONFIG_VARIANTS = {
    "llama3_config_disagrees": ("llama3_bpe", {"add_bos_token": False, "add_eos_token": True}),
    "sentencepiece_json_config_disagrees": (
        "sentencepiece_json", {"add_bos_token": False, "add_eos_token": True, "legacy": True}),
    "sentencepiece_json_no_prefix_space": ("sentencepiece_json", {"add_prefix_space": False}),
}


def _config_variant(out, name, source, fields):
    import shutil

    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(fields)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _legacy_json_beside_model(out, model, resaved):
    """The layout of older Llama 2 / Mistral / TinyLlama folders: tokenizer.model beside a
    tokenizer.json whose normalizer prepends and replaces (no pre_tokenizer), which lorad reads
    through tokenizer.model; its post_processor still decides BOS/EOS, whatever
    tokenizer_config.json's add_bos_token / add_eos_token say."""
    import shutil

    folder = out / "sentencepiece_legacy_json"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(resaved, folder)
    shutil.copy(model / "tokenizer.model", folder / "tokenizer.model")
    data = json.loads((resaved / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["pre_tokenizer"] = None
    for token in data["added_tokens"]:  # as such files mark theirs
        token["special"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update({"add_bos_token": False, "add_eos_token": True})
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    targets = {"sentencepiece": (model, "<|im_start|>", "<|im_end|>", "<s>")}
    targets["sentencepiece_json"] = (_resaved_by_transformers(out, pathlib.Path(model)),
                                     "<|im_start|>", "<|im_end|>", "<s>")
    targets.update(_fixtures(out))
    added, added_texts = _with_added_tokens(out, targets["llama3_bpe"][0])
    targets["llama3_added"] = (added, *targets["llama3_bpe"][1:])
    targets["sentencepiece_legacy_json"] = (
        _legacy_json_beside_model(out, pathlib.Path(model),
                                  pathlib.Path(targets["sentencepiece_json"][0])),
        *targets["sentencepiece"][1:])
    for name, (source, fields) in CONFIG_VARIANTS.items():
        folder, *specials = targets[source]
        targets[name] = (_config_variant(out, name, pathlib.Path(folder), fields), *specials)
    for name, (folder, *specials) in targets.items():
        extra = added_texts if name == "llama3_added" else ()
        refs = _references(pathlib.Path(folder), specials, extra)
        (out / f"{name}.json").write_text(json.dumps(refs, ensure_ascii=False, indent=1),
                                          encoding="utf-8")
