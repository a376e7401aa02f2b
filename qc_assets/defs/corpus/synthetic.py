"""Generated Japanese-like shards in fineweb-2-edu-japanese's 13-column schema, for benchmarks and tests.

The text is nonsense made of real Japanese words; it has the character mix and length of the real corpus,
which is what ingest, tokenization and storage costs depend on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FINEWEB_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("language_script", pa.string()),
        ("minhash_cluster_size", pa.int64()),
        ("top_langs", pa.string()),
        ("score", pa.float64()),
        ("token_count", pa.int64()),
    ]
)

_SUBJECTS = [
    "日本",
    "学校",
    "研究",
    "地域",
    "社会",
    "技術",
    "歴史",
    "文化",
    "環境",
    "経済",
    "教育",
    "医療",
    "科学",
    "情報",
    "言語",
    "自然",
    "生活",
    "産業",
    "政策",
    "データ",
]
_OBJECTS = [
    "仕組み",
    "役割",
    "影響",
    "方法",
    "課題",
    "特徴",
    "成果",
    "背景",
    "変化",
    "基礎",
    "考え方",
    "使い方",
    "歴史",
    "効果",
    "可能性",
    "重要性",
]
_VERBS = [
    "説明します",
    "紹介します",
    "考えます",
    "調べました",
    "見ていきます",
    "まとめました",
    "取り上げます",
    "解説します",
]
_CONNECTIVES = ["まず", "また", "さらに", "一方で", "そのため", "例えば", "特に", "最後に"]


def sentence_pool(size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = []
    for index in range(size):
        connective, subject, other, obj, verb = (
            rng.choice(_CONNECTIVES),
            rng.choice(_SUBJECTS),
            rng.choice(_SUBJECTS),
            rng.choice(_OBJECTS),
            rng.choice(_VERBS),
        )
        pool.append(f"{connective}、{subject}と{other}の{obj}について{index}番目の観点から{verb}。")
    return pool


def japanese_like_texts(count: int, mean_chars: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = sentence_pool(4096, seed)
    mean_sentence = sum(map(len, pool)) / len(pool)
    per_document = max(1, round(mean_chars / mean_sentence))
    choices = rng.integers(0, len(pool), size=(count, per_document))
    return [f"文書{seed}-{row}。" + "".join(pool[i] for i in picks) for row, picks in enumerate(choices)]


def fineweb_table(count: int, mean_chars: int = 1000, seed: int = 0) -> pa.Table:
    texts = japanese_like_texts(count, mean_chars, seed)
    ids = [f"<urn:uuid:{seed:08d}-0000-4000-8000-{row:012d}>" for row in range(count)]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=count)
    columns = {
        "text": texts,
        "id": ids,
        "dump": ["CC-MAIN-2024-10"] * count,
        "url": [f"https://example.jp/{seed}/{row}" for row in range(count)],
        "date": ["2024-03-01T00:00:00Z"] * count,
        "file_path": [f"s3://commoncrawl/synthetic/{seed}.warc.gz"] * count,
        "language": ["jpn"] * count,
        "language_score": np.full(count, 0.99),
        "language_script": ["Jpan"] * count,
        "minhash_cluster_size": np.ones(count, dtype=np.int64),
        "top_langs": ['{"jpn_Jpan_score": 0.99}'] * count,
        "score": np.full(count, 3.2),
        "token_count": (lengths * 0.8).astype(np.int64),
    }
    return pa.table(columns, schema=FINEWEB_SCHEMA)


def write_fineweb_shard(path: Path, count: int, mean_chars: int = 1000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(fineweb_table(count, mean_chars, seed), path, row_group_size=10_000)
    return path
