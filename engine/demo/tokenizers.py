"""The demo's tokenizers in the official formats, trained offline on a built-in text (deterministic).

CLIP-L: byte-level BPE (vocab.json + merges.txt), learnt here with ties broken by text so every run gives the same
merges; T5: SentencePiece Unigram (spiece.model + the tokenizer.json transformers builds from it).
"""
from __future__ import annotations

import pathlib

from .files import write_json

CORPUS = """\
a cat on a mat. a cat sitting on a red mat in the sun.
a photo of a dog running on the beach at sunset, golden hour, high detail.
portrait of a young woman with long silver hair and blue eyes, soft light, studio photo.
an old man with a white beard reading a book by the window, film grain.
a bowl of fresh fruit on a wooden table: apples, oranges, grapes and a banana.
a red sports car parked on a wet street at night, neon signs, reflections.
a small house in the mountains covered with snow, pine trees, clear blue sky.
an astronaut riding a horse on the moon, oil painting, dramatic lighting.
a castle on a hill above a quiet lake, fog in the morning, fantasy art.
a close up of a yellow flower with a bee, macro photography, shallow depth of field.
a city skyline seen from above, skyscrapers, clouds, aerial view, 4k.
a girl in a green dress dancing in the rain, umbrella, cinematic.
a bird sitting on a branch of a cherry tree in spring, pink blossoms.
the quick brown fox jumps over the lazy dog.
a cup of hot coffee and a croissant on a plate, breakfast, cozy cafe.
a robot playing chess against a child in a library, warm colors.
a ship sailing across the ocean during a storm, huge waves, lightning.
a forest path with tall trees and sunlight through the leaves, autumn colors.
an owl with big orange eyes in the dark woods, moonlight.
a bicycle leaning against a brick wall, green door, flower pots.
a watercolor painting of a river valley with hills and a small bridge.
a pencil sketch of a horse, black and white, simple lines.
a knight in shining armor holding a sword and a shield, epic scene.
a plate of pasta with tomato sauce and basil, top view, food photo.
a frog wearing a tiny hat, sitting on a leaf, cute, 3d render.
a desert with sand dunes under a starry sky, milky way, long exposure.
a lighthouse on a rocky coast, waves crashing, seagulls, evening.
a child flying a kite in a field of tall grass, summer afternoon.
two friends laughing at a table in a restaurant, candid photo.
a glass of water on a table, sharp focus, minimal background, white.
a dragon flying over a village, smoke, fire, wings spread wide.
a wooden boat on a calm lake with mountains behind, reflection, dawn.
a man in a suit walking through a crowded train station, motion blur.
a street market with colorful fabrics, spices and people shopping.
a black cat with green eyes looking at the camera, close portrait.
an apple, a pear and a lemon painted in the style of an old master.
a garden with roses, tulips and sunflowers next to a stone fountain.
a snowy owl and a fox in the winter forest, children's book illustration.
a vintage camera on a shelf with old photographs and letters.
a mountain climber on a steep cliff, rope, bright jacket, blue sky.
a bakery window full of bread, cakes and cookies, warm light.
a neon sign that says open, glowing pink and blue at midnight.
a whale jumping out of the sea near a small fishing boat.
a teddy bear on a bed with a blanket, soft morning light.
a temple in the jungle covered with vines, ancient ruins, mystery.
a hot air balloon floating over green fields and small farms.
a musician playing guitar on a stage, spotlight, concert crowd.
a kitchen with copper pots, herbs and a big window, rustic style.
a panda eating bamboo, sitting in the grass, nature documentary.
a futuristic city with flying cars and glass towers, science fiction.
an empty road through the desert, heat haze, a single cactus.
a little girl and her grandmother baking cookies together, happy.
a tiger resting in the shade of a tree, stripes, intense eyes.
a map on a desk with a compass, a candle and a quill pen.
a rainbow over a waterfall, mist, tropical plants, bright colors.
a cozy reading corner with a chair, a lamp, a cat and many books.
a pair of red shoes on a wooden floor, product photo, clean.
a portrait of a man with glasses and a hat, black and white photograph.
a bridge over a river in a big city at night, lights on the water.
a field of lavender in france, purple rows, a farmhouse in the distance.
a group of penguins standing on the ice, cold, blue and white.
a cake with candles on a birthday table, balloons, party.
one two three four five six seven eight nine ten, 1 2 3 4 5 6 7 8 9 0.
a painting, a drawing, a photo, a render, an illustration, a poster, a logo, a sticker.
very detailed, high quality, best quality, masterpiece, sharp, realistic, beautiful, simple, dark, bright.
red orange yellow green blue purple pink brown black white gray gold silver.
small big tall short long round square old new young happy sad calm angry quiet loud.
A Photo Of The Eiffel Tower In Paris, France; New York City (USA) - Tokyo & Kyoto [Japan]!
What is this? It's "art": 50% light + 50% shadow / 100 @ home #1 ~ $5 * 2 = 10 > 9 < 11 | \\ ^ _ {x}.
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789.
"""


def corpus_lines() -> list:
    """The built-in text the demo tokenizers are trained on, one non-empty line each."""
    return [ln.strip() for ln in CORPUS.splitlines() if ln.strip()]


def _bytes_to_unicode():
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _learn_bpe(words: dict, max_merges: int) -> list:
    """Plain BPE merge learning over {symbol tuple: count}; ties broken by the pair's text, so the result is the
    same on every run (the `tokenizers` trainer breaks ties in hash order)."""
    import heapq
    from collections import defaultdict

    entries = [[list(w), c] for w, c in sorted(words.items())]
    counts = defaultdict(int)
    where = defaultdict(set)
    for i, (syms, c) in enumerate(entries):
        for q in zip(syms, syms[1:]):
            counts[q] += c
            where[q].add(i)
    heap = [(-c, q) for q, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < max_merges:
        neg, p = heapq.heappop(heap)
        if counts.get(p, 0) != -neg or neg >= 0:
            continue  # stale entry
        merges.append(p)
        new = p[0] + p[1]
        touched = set()
        for i in sorted(where.pop(p, ())):
            syms, c = entries[i]
            old = list(zip(syms, syms[1:]))
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == p[0] and syms[j + 1] == p[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            if len(out) == len(syms):
                continue
            entries[i][0] = out
            for q in old:
                counts[q] -= c
            for q in zip(out, out[1:]):
                counts[q] += c
                where[q].add(i)
            touched.update(old)
            touched.update(zip(out, out[1:]))
        counts.pop(p, None)
        for q in sorted(touched):
            if counts.get(q, 0) > 0:
                heapq.heappush(heap, (-counts[q], q))
            else:
                counts.pop(q, None)
    return merges


def write_clip_tokenizer(folder: pathlib.Path, max_merges: int = 2000) -> int:
    """CLIP's BPE format: vocab = 256 byte symbols, the same with </w>, the merges' results, then
    <|startoftext|>, <|endoftext|> (the highest id, as in the real 49408-token vocabulary)."""
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    # The same normalisation and pre-tokenisation transformers' CLIPTokenizer applies.
    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = Counter()
    for line in corpus_lines():
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            words[tuple(w[:-1]) + (w[-1] + "</w>",)] += 1
    merges = _learn_bpe(words, max_merges)
    byte_syms = list(_bytes_to_unicode().values())

    vocab = {}
    for s in byte_syms + [s + "</w>" for s in byte_syms]:
        vocab.setdefault(s, len(vocab))
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab:  # always true for BPE; guards the file format
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS},
        "eos_token": {**special, "content": CLIP_EOS},
        "pad_token": CLIP_EOS,
        "unk_token": {**special, "content": CLIP_EOS},
    })
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[t]): {**special, "content": t, "special": True} for t in (CLIP_BOS, CLIP_EOS)},
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": False,  # True in the real file; transformers 5 ignores it for BPE and warns
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    })
    return len(vocab)


def write_t5_tokenizer(folder: pathlib.Path, target_vocab: int = 1000) -> int:
    """T5's SentencePiece Unigram format: <pad>=0, </s>=1, <unk>=2, pieces, then <extra_id_99>..<extra_id_0>.
    Returns the tokenizer's size (pieces + 100 sentinels)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, vocab_size=target_vocab, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        shuffle_input_sentence=False, normalization_rule_name="nmt_nfkc")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    n_pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()

    extra = [f"<extra_id_{i}>" for i in range(100)]
    # tokenizer.json: the fast tokenizer transformers itself builds from spiece.model (Unigram + Precompiled
    # normaliser + Metaspace), saved as the real repo ships it next to spiece.model.
    from transformers import T5Tokenizer

    fast = T5Tokenizer.from_pretrained(str(folder), extra_ids=100, legacy=True, model_max_length=512)
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    size = len(fast)
    if size != n_pieces + 100:
        raise RuntimeError(f"demo: T5 tokenizer has {size} tokens, expected {n_pieces} pieces + 100 sentinels")

    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **special} for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    for i in range(100):
        added[str(n_pieces + 99 - i)] = {"content": f"<extra_id_{i}>", **special}
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 100,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    st = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extra,
        "eos_token": {"content": "</s>", **st},
        "pad_token": {"content": "<pad>", **st},
        "unk_token": {"content": "<unk>", **st},
    })
    return size
