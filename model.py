"""Pre-LayerNorm encoder-decoder Transformer with cross-layer parameter sharing, plus cached greedy and beam search.

Pure PyTorch: knows nothing about tokenizers, files or data. Token ids in, logits or token ids out.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_layout(share, n_layers, n_unique):
    """Which unique block each of the n_layers positions uses (Takase & Kiyono 2021)."""
    if share == "none":
        return list(range(n_layers))
    if share == "sequence":  # 0,0,1,1,2,2
        return [i * n_unique // n_layers for i in range(n_layers)]
    if share == "cycle":  # 0,1,2,0,1,2
        return [i % n_unique for i in range(n_layers)]
    if share == "cycle_rev":  # 0,1,2,2,1,0: cycle, except the last group runs in reverse
        n_cycled = n_unique * (math.ceil(n_layers / n_unique) - 1)
        return [i % n_unique for i in range(n_cycled)] + [n_unique - 1 - j for j in range(n_layers - n_cycled)]
    raise ValueError(f"unknown sharing layout {share!r}")


class Attention(nn.Module):
    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split_heads(self, x):  # (B, T, D) -> (B, H, T, D/H)
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def keys_values(self, source):
        key, value = self.key_value(source).chunk(2, dim=-1)
        return self._split_heads(key), self._split_heads(value)

    def forward(self, x, key, value, mask=None, causal=False):
        query = self._split_heads(self.query(x))
        y = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


class EncoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout):
        super().__init__()
        self.self_attn_norm, self.self_attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.ff_norm, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        h = self.self_attn_norm(x)
        x = x + self.dropout(self.self_attn(h, *self.self_attn.keys_values(h), mask=mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout):
        super().__init__()
        self.self_attn_norm, self.self_attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.cross_attn_norm, self.cross_attn = nn.LayerNorm(d_model), Attention(d_model, n_heads, dropout)
        self.ff_norm, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, memory_mask, cache=None, self_mask=None):
        """With a cache (a dict owned by this layer position) x holds only the newest tokens.
        self_mask (packed rows only) replaces plain causal masking."""
        h = self.self_attn_norm(x)
        key, value = self.self_attn.keys_values(h)
        if cache is not None:
            if "self_key" in cache:
                key, value = torch.cat([cache["self_key"], key], 2), torch.cat([cache["self_value"], value], 2)
            cache["self_key"], cache["self_value"] = key, value
        # Right-padded targets need no key-padding mask: causality already hides later (pad) positions.
        x = x + self.dropout(self.self_attn(h, key, value, mask=self_mask, causal=cache is None and self_mask is None))
        if cache is not None and "cross_key" in cache:
            key, value = cache["cross_key"], cache["cross_value"]
        else:
            key, value = self.cross_attn.keys_values(memory)
            if cache is not None:
                cache["cross_key"], cache["cross_value"] = key, value
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), key, value, mask=memory_mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


def positions_in_segment(segments):
    """Each token's position inside its own sentence: in a packed row the count restarts at every sentence."""
    index = torch.arange(segments.size(1), device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(1).values


def _same_segment(query_segments, key_segments):
    """(B, 1, Tq, Tk) attention mask of packed rows: True where query and key belong to the same sentence.
    Padding (segment 0) queries see every key: their outputs are never used, and a query that sees no key
    at all would turn into NaN."""
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return (same | (query_segments == 0)[:, :, None])[:, None]


def sinusoidal_positions(n_positions, d_model):
    position = torch.arange(n_positions).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class Transformer(nn.Module):
    def __init__(self, src_vocab_size, tgt_vocab_size, pad_id, d_model=512, n_heads=8, d_ff=2048, n_layers=6,
                 n_unique_layers=6, share="none", tie_embeddings=False, dropout=0.1, max_positions=1024):
        super().__init__()
        if tie_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError("tied embeddings need one joint vocabulary")
        self.pad_id, self.d_model, self.max_positions = pad_id, d_model, max_positions
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = self.src_embed if tie_embeddings else nn.Embedding(tgt_vocab_size, d_model)
        self.output = nn.Linear(d_model, tgt_vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.tgt_embed.weight
        self.register_buffer("positions", sinusoidal_positions(max_positions, d_model), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        self.layout = layer_layout(share, n_layers, n_unique_layers)
        n_blocks = max(self.layout) + 1
        encoder_blocks = [EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_blocks)]
        decoder_blocks = [DecoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_blocks)]
        # Shared positions hold the very same module objects, so they share parameters and gradients.
        self.encoder_layers = nn.ModuleList(encoder_blocks[i] for i in self.layout)
        self.decoder_layers = nn.ModuleList(decoder_blocks[i] for i in self.layout)
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # N(0, 1/d) embeddings: scaled by sqrt(d) they have unit variance, and tied logits stay small.
        for embedding in dict.fromkeys([self.src_embed, self.tgt_embed]):  # ordered: init must be reproducible
            nn.init.normal_(embedding.weight, std=self.d_model ** -0.5)

    def parameter_counts(self):
        """(total, unique): total counts a shared block or tied matrix once per use, unique once."""
        total = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))
        return total, sum(p.numel() for p in self.parameters())

    def _embed(self, embedding, ids, offset=0, segments=None):
        if segments is None:
            length = offset + ids.size(1)
            if length > self.max_positions:
                raise ValueError(f"a sequence of {length} tokens exceeds max_positions={self.max_positions}")
            positions = self.positions[offset:length]
        else:  # a packed row may be wider than max_positions: only each sentence's own positions count
            positions = self.positions[positions_in_segment(segments)]
        return self.embed_dropout(embedding(ids) * math.sqrt(self.d_model) + positions)

    def encode(self, src, src_segments=None):
        """src (B, S) padded ids -> memory (B, S, D) and the key-padding mask (B, 1, 1, S), True = real token.

        src_segments (B, S) marks packed rows: the sentence number of each token (1, 2, ...; 0 = padding).
        Tokens then attend only within their own sentence, so every sentence is encoded as if alone."""
        src_mask = (src != self.pad_id)[:, None, None, :]
        self_mask = src_mask if src_segments is None else _same_segment(src_segments, src_segments)
        x = self._embed(self.src_embed, src, segments=src_segments)
        for layer in self.encoder_layers:
            x = layer(x, self_mask)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt_in, memory, memory_mask, cache=None, offset=0, tgt_segments=None):
        """Logits (B, T, V) for decoder inputs tgt_in; with a cache, tgt_in is the tokens from position offset on.
        memory_mask: encode's key-padding mask, or for packed rows the (B, 1, T, S) sentence-to-sentence mask."""
        self_mask = None
        if tgt_segments is not None:
            causal = torch.ones(tgt_in.size(1), tgt_in.size(1), dtype=torch.bool, device=tgt_in.device).tril()
            self_mask = _same_segment(tgt_segments, tgt_segments) & causal
        x = self._embed(self.tgt_embed, tgt_in, offset, tgt_segments)
        for position, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, memory_mask, None if cache is None else cache[position], self_mask)
        return self.output(self.decoder_norm(x))

    def forward(self, src, tgt_in, src_segments=None, tgt_segments=None):
        """Teacher-forced logits. With segments (packed rows, see encode) each target sentence sees only
        its own source sentence; the logits of every sentence equal those it gets unpacked."""
        if src_segments is None:
            memory, src_mask = self.encode(src)
            return self.decode(tgt_in, memory, src_mask)
        memory, _ = self.encode(src, src_segments)
        return self.decode(tgt_in, memory, _same_segment(tgt_segments, src_segments), tgt_segments=tgt_segments)

    def new_cache(self):
        """One slot per decoder layer position: a block shared by two positions owns two slots."""
        return [{} for _ in self.decoder_layers]


# ---------------------------------------------------------------- decoding

def _limits(src, pad_id, max_len_extra, max_len):
    """Per-sentence output budget: max_len tokens if given, else source length + max_len_extra."""
    if max_len:
        return [max_len] * src.size(0)
    return ((src != pad_id).sum(1) + max_len_extra).tolist()


@torch.no_grad()
def greedy_search(model, src, sos_id, eos_id, max_len_extra=50, max_len=0, use_cache=True):
    """Batched greedy decoding. Sentence i emits at most len(src_i) + max_len_extra tokens (EOS included),
    or max_len if given. Returns one list of token ids per sentence, without SOS/EOS."""
    limits = _limits(src, model.pad_id, max_len_extra, max_len)
    memory, src_mask = model.encode(src)
    tokens = torch.full((src.size(0), 1), sos_id, dtype=torch.long, device=src.device)
    limit = torch.tensor(limits, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    cache = model.new_cache() if use_cache else None
    for step in range(max(limits)):
        if use_cache:
            logits = model.decode(tokens[:, -1:], memory, src_mask, cache, offset=step)
        else:
            logits = model.decode(tokens, memory, src_mask)
        next_token = logits[:, -1].argmax(-1).masked_fill(done, eos_id)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        done |= (next_token == eos_id) | (step + 1 >= limit)
        if done.all():
            break
    return [_strip(row[1:], eos_id, n) for row, n in zip(tokens.tolist(), limits)]


def _strip(ids, eos_id, limit):
    ids = ids[:limit]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def length_normalized(log_prob, length, alpha):
    """GNMT length penalty (Wu et al. 2016): log P / ((5 + |Y|) / 6) ** alpha, |Y| counting EOS."""
    return log_prob / ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model, src, sos_id, eos_id, beam=4, alpha=0.6, max_len_extra=50, max_len=0):
    """Batched beam search with the decoder cache. A sentence stops once it has `beam` finished hypotheses
    (or at its length limit); the best finished hypothesis by length-normalised log-probability wins."""
    n, device = src.size(0), src.device
    limits = _limits(src, model.pad_id, max_len_extra, max_len)
    memory, src_mask = model.encode(src)
    memory, src_mask = memory.repeat_interleave(beam, 0), src_mask.repeat_interleave(beam, 0)
    tokens = torch.full((n * beam, 1), sos_id, dtype=torch.long, device=device)
    scores = torch.full((n, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    finished, done = [[] for _ in range(n)], [False] * n
    cache = model.new_cache()
    for step in range(max(limits)):
        log_probs = model.decode(tokens[:, -1:], memory, src_mask, cache, offset=step)[:, -1].float().log_softmax(-1)
        vocab = log_probs.size(-1)
        candidates = (scores.view(-1, 1) + log_probs).view(n, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)
        rows = tokens.tolist()
        next_beam, next_token, next_score = [], [], []
        for i, (cand_scores, cand_index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
            alive = []
            if not done[i]:
                at_limit = step + 1 >= limits[i]
                for rank, (score, index) in enumerate(zip(cand_scores, cand_index)):
                    source_beam, token = divmod(index, vocab)
                    if token == eos_id or at_limit:
                        if rank < beam:  # an EOS ranked below the beam would not have survived
                            hypothesis = rows[i * beam + source_beam][1:] + ([] if token == eos_id else [token])
                            finished[i].append((length_normalized(score, step + 1, alpha), hypothesis))
                    elif len(alive) < beam:
                        alive.append((source_beam, token, score))
                    if len(alive) == beam and rank >= beam - 1:
                        break
                done[i] = at_limit or len(finished[i]) >= beam
                if done[i]:
                    alive = []
            alive += [(0, eos_id, float("-inf"))] * (beam - len(alive))  # done sentences carry dead beams
            for source_beam, token, score in alive:
                next_beam.append(i * beam + source_beam)
                next_token.append(token)
                next_score.append(score)
        if all(done):
            break
        order = torch.tensor(next_beam, device=device)
        tokens = torch.cat([tokens[order], torch.tensor(next_token, device=device)[:, None]], 1)
        scores = torch.tensor(next_score, device=device).view(n, beam)
        for slot in cache:
            slot["self_key"], slot["self_value"] = slot["self_key"][order], slot["self_value"][order]
    return [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in finished]


def translate(model, sources, sos_id, eos_id, beam=1, alpha=0.6, max_len_extra=50, max_len=0, batch_size=64,
              use_cache=True):
    """Translate token-id lists (no specials; EOS is appended as in training) in length-sorted batches,
    returning token-id lists in input order. beam=1 is greedy search."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
    results = [None] * len(sources)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        src = torch.full((len(batch), max(len(sources[i]) for i in batch) + 1), model.pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            src[row, :len(sources[i]) + 1] = torch.tensor(sources[i] + [eos_id])
        src = src.to(device)
        if beam == 1:
            outputs = greedy_search(model, src, sos_id, eos_id, max_len_extra, max_len, use_cache)
        else:
            outputs = beam_search(model, src, sos_id, eos_id, beam, alpha, max_len_extra, max_len)
        for i, output in zip(batch, outputs):
            results[i] = output
    model.train(was_training)
    return results
