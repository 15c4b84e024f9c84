"""Pre-LayerNorm encoder-decoder Transformer with cross-layer parameter sharing, plus cached greedy and beam search.

Pure PyTorch: knows nothing about tokenizers, files or data. Token ids in, logits or token ids out.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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
    """Multi-head attention over heads already projected (forward). Self-attention projects its queries, keys
    and values in one matrix product; cross-attention projects its queries per call and the memory's keys and
    values once per block (keys_values)."""
    def __init__(self, d_model, n_heads, attn_dropout, self_attention):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        if self_attention:
            self.query_key_value = nn.Linear(d_model, 3 * d_model)
        else:
            self.query = nn.Linear(d_model, d_model)
            self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, projected, n):
        """(B, T, n * D) -> n tensors (B, H, T, D/H): heads split, as attention takes them."""
        return projected.unflatten(-1, (n, self.n_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

    def queries_keys_values(self, x):
        return self._heads(self.query_key_value(x), 3)

    def queries(self, x):
        return self._heads(self.query(x), 1)[0]

    def keys_values(self, source):
        return self._heads(self.key_value(source), 2)

    def forward(self, query, key, value, mask=None, causal=False):
        if query.device.type == "cpu" and not torch.is_grad_enabled():
            y = plain_attention(query, key, value, mask, causal)
        else:
            # Training in bf16 on a CPU, PyTorch's fused attention is slower than its matmul-softmax-matmul, whose
            # matrix products use the CPU's bf16 units (measured: the default step took 255 instead of 376 ms)
            slow_fused = query.device.type == "cpu" and query.dtype == torch.bfloat16
            with sdpa_kernel(SDPBackend.MATH) if slow_fused else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                   dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


def plain_attention(query, key, value, mask, causal):
    """Softmax attention as two matrix products, for inference on a CPU: at decoding's shapes (one query per
    sentence, a few dozen keys) PyTorch's fused CPU kernels took 2-4x as long (bench: 3.5 against 1.2 ms for
    666 sentences x 9 keys in bf16). The softmax runs in fp32, as the fused kernels do."""
    scores = query @ key.transpose(-1, -2) * query.size(-1) ** -0.5
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(value.dtype) @ value


class FeedForward(nn.Sequential):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


class EncoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout, attn_dropout):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, attn_dropout, self_attention=True)
        self.ff_norm, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = x + self.dropout(self.self_attn(*self.self_attn.queries_keys_values(self.self_attn_norm(x)), mask=mask))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout, attn_dropout):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, attn_dropout, self_attention=True)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, n_heads, attn_dropout, self_attention=False)
        self.ff_norm, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory_keys_values, memory_mask, cache=None, self_mask=None, offset=0):
        """memory_keys_values: cross_attn.keys_values(memory), which the model computes once per block. With a
        cache (a dict owned by this layer position) x holds only the newest token, at position offset.
        self_mask (packed rows only) replaces plain causal masking."""
        query, key, value = self.self_attn.queries_keys_values(self.self_attn_norm(x))
        if cache is not None:
            if "self_key" not in cache:  # preallocated once, then written in place: no copy of the past per token
                shape = (*key.shape[:2], cache["capacity"], key.size(3))
                cache["self_key"], cache["self_value"] = key.new_empty(shape), value.new_empty(shape)
            end = offset + key.size(2)
            cache["self_key"][:, :, offset:end], cache["self_value"][:, :, offset:end] = key, value
            key, value = cache["self_key"][:, :, :end], cache["self_value"][:, :, :end]
        # Right-padded targets need no key-padding mask: causality already hides later (pad) positions.
        x = x + self.dropout(self.self_attn(query, key, value, mask=self_mask,
                                            causal=cache is None and self_mask is None))
        x = x + self.dropout(self.cross_attn(self.cross_attn.queries(self.cross_attn_norm(x)), *memory_keys_values,
                                             mask=memory_mask))
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
                 n_unique_layers=6, share="none", tie_embeddings=False, dropout=0.1, attn_dropout=0.0,
                 max_positions=1024, n_decoder_layers=0):
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
        # n_decoder_layers (0: as many as the encoder) below n_layers: a deep encoder and a shallow decoder
        # (Kasai et al. 2021), whose decoder draws on at most as many blocks as it has layers.
        n_decoder_layers = n_decoder_layers or n_layers
        self.layout = layer_layout(share, n_layers, n_unique_layers)
        self.decoder_layout = layer_layout(share, n_decoder_layers, min(n_unique_layers, n_decoder_layers))
        encoder_blocks = [EncoderBlock(d_model, n_heads, d_ff, dropout, attn_dropout)
                          for _ in range(max(self.layout) + 1)]
        decoder_blocks = [DecoderBlock(d_model, n_heads, d_ff, dropout, attn_dropout)
                          for _ in range(max(self.decoder_layout) + 1)]
        # Shared positions hold the very same module objects, so they share parameters and gradients.
        self.encoder_layers = nn.ModuleList(encoder_blocks[i] for i in self.layout)
        self.decoder_layers = nn.ModuleList(decoder_blocks[i] for i in self.decoder_layout)
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self._init_weights()

    def _init_weights(self):
        joined = {attention.query_key_value for attention in self.modules()
                  if isinstance(attention, Attention) and hasattr(attention, "query_key_value")}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # A joined query-key-value matrix starts as its queries' and its keys-values' matrices did when
                # they were two (Xavier bounds from each part's shape): the defaults were measured so.
                d = module.in_features
                for weight in module.weight.split([d, 2 * d]) if module in joined else [module.weight]:
                    nn.init.xavier_uniform_(weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # N(0, 1/d) embeddings: scaled by sqrt(d) they have unit variance, and tied logits stay small.
        for embedding in dict.fromkeys([self.src_embed, self.tgt_embed]):  # ordered: init must be reproducible
            nn.init.normal_(embedding.weight, std=self.d_model ** -0.5)

    def parameter_counts(self):
        """(total, unique): total counts a shared block or tied matrix once per use, unique once."""
        total = sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))
        return total, sum(p.numel() for p in self.parameters())

    def training_flops_per_token(self, lengths):
        """Analytic matmul FLOPs of one training step per real (source + target) token, for examples of these
        lengths (source lengths, target lengths): forward and backward (2 + 4 FLOPs per multiply-add) through every
        layer use, the output projection, and attention scores within each sentence (causal self-attention counted
        half). Embedding lookups and the optimizer are left out, as in the usual model-FLOPs-utilisation count."""
        d, n, vocab = self.d_model, len(self.encoder_layers), self.output.out_features
        n_decoder, n_decoder_blocks = len(self.decoder_layers), len(set(self.decoder_layers))
        d_ff = self.encoder_layers[0].ff[0].out_features
        s_sum = s2_sum = t_sum = t2_sum = ts_sum = 0  # the count is linear in these, summed a chunk at a time
        for start in range(0, len(lengths[0]), 1 << 16):
            s, t = (np.asarray(side[start:start + (1 << 16)], dtype=np.int64) for side in lengths)
            s_sum, s2_sum, t_sum = s_sum + int(s.sum()), s2_sum + int((s * s).sum()), t_sum + int(t.sum())
            t2_sum, ts_sum = t2_sum + int((t * t).sum()), ts_sum + int((t * s).sum())
        encoder = n * (s_sum * (4 * d * d + 2 * d * d_ff) + 2 * s2_sum * d)
        # the memory's keys and values are computed once per decoder block (see memory_keys_values)
        decoder = (n_decoder * (t_sum * (6 * d * d + 2 * d * d_ff) + t2_sum * d + 2 * ts_sum * d)
                   + n_decoder_blocks * s_sum * 2 * d * d)
        return 6 * (encoder + decoder + t_sum * d * vocab) / (s_sum + t_sum)

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

    def memory_keys_values(self, memory):
        """Cross-attention (keys, values) of the encoder memory for each decoder position. Positions that share
        a block share the very same pair: computed once per block, in training and decoding alike."""
        per_block = {block: block.cross_attn.keys_values(memory) for block in dict.fromkeys(self.decoder_layers)}
        return [per_block[block] for block in self.decoder_layers]

    def decode(self, tgt_in, memory, memory_mask, cache=None, offset=0, tgt_segments=None):
        """Logits (B, T, V) for decoder inputs tgt_in; with a cache (new_cache), tgt_in is the one token at offset,
        and the memory's keys and values are computed at the first call only (select_rows keeps them in step).
        memory_mask: encode's key-padding mask, or for packed rows the (B, 1, T, S) sentence-to-sentence mask."""
        self_mask = None
        if tgt_segments is not None:
            causal = torch.ones(tgt_in.size(1), tgt_in.size(1), dtype=torch.bool, device=tgt_in.device).tril()
            self_mask = _same_segment(tgt_segments, tgt_segments) & causal
        if cache is not None and "memory" not in cache[0]:
            for slot, keys_values in zip(cache, self.memory_keys_values(memory)):
                slot["memory"] = keys_values
        memory_keys_values = self.memory_keys_values(memory) if cache is None else [slot["memory"] for slot in cache]
        x = self._embed(self.tgt_embed, tgt_in, offset, tgt_segments)
        for position, layer in enumerate(self.decoder_layers):
            x = layer(x, memory_keys_values[position], memory_mask, None if cache is None else cache[position],
                      self_mask, offset)
        return self.output(self.decoder_norm(x))

    def forward(self, src, tgt_in, src_segments=None, tgt_segments=None):
        """Teacher-forced logits. With segments (packed rows, see encode) each target sentence sees only
        its own source sentence; the logits of every sentence equal those it gets unpacked."""
        if src_segments is None:
            memory, src_mask = self.encode(src)
            return self.decode(tgt_in, memory, src_mask)
        memory, _ = self.encode(src, src_segments)
        return self.decode(tgt_in, memory, _same_segment(tgt_segments, src_segments), tgt_segments=tgt_segments)

    def new_cache(self, capacity):
        """One slot per decoder layer position (a block shared by two positions owns two slots), each
        holding up to `capacity` tokens of keys and values."""
        return [{"capacity": capacity} for _ in self.decoder_layers]


# ---------------------------------------------------------------- decoding

def select_rows(cache, rows, length):
    """Keep only these batch rows of every cached tensor, in this order (finished sentences leave the batch);
    of the self-attention buffers only the first `length` tokens are filled and copied. Memory keys and
    values shared by several positions (one block) are selected once and stay shared."""
    selected = {}
    for slot in cache:
        pair = slot["memory"]
        if id(pair) not in selected:
            selected[id(pair)] = tuple(tensor.index_select(0, rows) for tensor in pair)
        slot["memory"] = selected[id(pair)]
        for name in ("self_key", "self_value"):
            kept = slot[name].new_empty((rows.numel(), *slot[name].shape[1:]))
            kept[:, :, :length] = slot[name][rows, :, :length]
            slot[name] = kept


def reorder_beams(cache, rows, length):
    """Beam search: every row takes over the first `length` cached self-attention tokens of row rows[i]."""
    for slot in cache:
        for name in ("self_key", "self_value"):
            slot[name][:, :, :length] = slot[name][rows, :, :length]


def output_limits(src_lengths, max_len_a, max_len_b, max_len, max_positions):
    """Most tokens (EOS included) each sentence may emit, for sources of src_lengths tokens (EOS included; a
    tensor): max_len if given, else a * source length + b (fairseq's max_len_a/max_len_b), never more than the
    model's positions allow."""
    if max_len:
        limits = torch.full_like(src_lengths, max_len)
    else:
        # clamped while still floating point: a huge max_len_a would overflow the integer conversion
        limits = (src_lengths * max_len_a + max_len_b).clamp(1, max_positions - 1).long()
    return limits.clamp(1, max_positions - 1)


def _strip(ids, eos_id):
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def greedy_search(model, src, sos_id, eos_id, max_len_a=1.2, max_len_b=10, max_len=0, use_cache=True):
    """Batched greedy decoding; see output_limits for the length limit. The first token is never EOS: an empty
    translation is never right (fairseq's min_len 1, CTranslate2's min_decoding_length 1). A sentence leaves
    the running batch (and the cache) as soon as it ends. Returns one list of token ids per sentence, without
    SOS/EOS."""
    limits = output_limits((src != model.pad_id).sum(1), max_len_a, max_len_b, max_len, model.max_positions)
    n_steps = int(limits.max())
    memory, src_mask = model.encode(src)
    output = torch.full((src.size(0), n_steps), eos_id, dtype=torch.long, device=src.device)
    running = torch.arange(src.size(0), device=src.device)  # the sentence each batch row decodes
    prefix = torch.full((src.size(0), 1), sos_id, dtype=torch.long, device=src.device)
    cache = model.new_cache(n_steps) if use_cache else None
    eos = torch.tensor([eos_id], device=src.device)
    for step in range(n_steps):
        if use_cache:
            logits = model.decode(prefix[:, -1:], memory, src_mask, cache, offset=step)
        else:
            logits = model.decode(prefix, memory, src_mask)
        next_token = logits[:, -1].index_fill(-1, eos, float("-inf")).argmax(-1) if step == 0 else \
            logits[:, -1].argmax(-1)
        output[running, step] = next_token
        going = (next_token != eos_id) & (step + 1 < limits[running])
        if not going.all():
            rows = going.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            running, memory, src_mask, next_token, prefix = (t[rows] for t in (running, memory, src_mask,
                                                                               next_token, prefix))
            if use_cache:
                select_rows(cache, rows, step + 1)
        prefix = torch.cat([prefix, next_token[:, None]], 1)
    return [_strip(row[:limit], eos_id) for row, limit in zip(output.tolist(), limits.tolist())]


def length_normalized(log_prob, length, alpha):
    """GNMT length penalty (Wu et al. 2016): log P / ((5 + |Y|) / 6) ** alpha, |Y| counting EOS."""
    return log_prob / ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model, src, sos_id, eos_id, beam=4, alpha=0.6, max_len_a=1.2, max_len_b=10, max_len=0,
                use_cache=True):
    """Batched beam search with the decoder cache, in tensor ops over sentences x beams. Each step keeps the
    `beam` best unfinished candidates of a sentence; a candidate ending in EOS and ranked within the beam
    is a finished hypothesis (never at the first step, as in greedy_search). A sentence stops once it has
    `beam` of them (or at its length limit), and its best finished hypothesis by length-normalised
    log-probability wins. use_cache=False recomputes every prefix (the reference the cache must match)."""
    n, device = src.size(0), src.device
    limits = output_limits((src != model.pad_id).sum(1), max_len_a, max_len_b, max_len, model.max_positions)
    n_steps = int(limits.max())
    memory, src_mask = model.encode(src)
    memory, src_mask = memory.repeat_interleave(beam, 0), src_mask.repeat_interleave(beam, 0)
    running = torch.arange(n, device=device)  # the sentence of each group of `beam` rows
    history = torch.full((n, beam, n_steps), eos_id, dtype=torch.long, device=device)
    scores = torch.full((n, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    best_score = torch.full((n,), float("-inf"), device=device)
    best = torch.full((n, n_steps), eos_id, dtype=torch.long, device=device)
    n_finished = torch.zeros(n, dtype=torch.long, device=device)
    last = torch.full((n * beam, 1), sos_id, dtype=torch.long, device=device)
    rank = torch.arange(2 * beam, device=device)
    cache = model.new_cache(n_steps) if use_cache else None
    for step in range(n_steps):
        m = running.numel()
        if use_cache:
            logits = model.decode(last, memory, src_mask, cache, offset=step)
        else:
            prefix = torch.cat([torch.full((m * beam, 1), sos_id, device=device),
                                history[running, :, :step].reshape(m * beam, step)], 1)
            logits = model.decode(prefix, memory, src_mask)
        log_probs = logits[:, -1].float().log_softmax(-1)
        if step == 0:
            log_probs[:, eos_id] = float("-inf")
        vocab = log_probs.size(-1)
        candidates = (scores.view(-1, 1) + log_probs).view(m, beam * vocab)
        top_scores, top_index = candidates.topk(2 * beam, dim=1)  # at most `beam` of them end in EOS
        source_beam, token = top_index // vocab, top_index % vocab
        hypotheses = history[running].gather(1, source_beam[:, :, None].expand(-1, -1, n_steps)).clone()
        hypotheses[:, :, step] = token
        at_limit = (step + 1 >= limits[running])[:, None]
        ends = (token == eos_id) | at_limit
        finished = ends & (rank < beam)  # an EOS ranked below the beam would not have survived
        normalized = length_normalized(top_scores, step + 1, alpha).masked_fill(~finished, float("-inf"))
        step_best, step_index = normalized.max(1)
        better = step_best > best_score[running]
        best_score[running] = torch.where(better, step_best, best_score[running])
        best[running] = torch.where(better[:, None], hypotheses[torch.arange(m, device=device), step_index],
                                    best[running])
        n_finished[running] += finished.sum(1)
        # the first `beam` candidates that do not end go on, in rank order
        keep = (rank + 2 * beam * ends).argsort(1)[:, :beam]
        scores = top_scores.gather(1, keep)
        history[running] = hypotheses.gather(1, keep[:, :, None].expand(-1, -1, n_steps))
        last = token.gather(1, keep).view(-1, 1)
        rows = (torch.arange(m, device=device)[:, None] * beam + source_beam.gather(1, keep)).view(-1)
        going = (n_finished[running] < beam) & ~at_limit[:, 0]
        if not going.all():
            kept = going.nonzero().squeeze(1)
            if kept.numel() == 0:
                break
            running, scores, last = running[kept], scores[kept], last.view(m, beam)[kept].view(-1, 1)
            rows = rows.view(m, beam)[kept].view(-1)
            memory, src_mask = memory[rows], src_mask[rows]
            if use_cache:
                select_rows(cache, rows, step + 1)
        elif use_cache:  # beams of one sentence share its cross-attention keys: only the self-attention past moves
            reorder_beams(cache, rows, step + 1)
    return [_strip(row[:limit], eos_id) for row, limit in zip(best.tolist(), limits.tolist())]


def int8_linear_layers(model):
    """A copy of the model for CPU inference whose Linear layers hold int8 weights and quantize their inputs
    on the fly (dynamic quantization, as CTranslate2 and Marian serve on CPUs); it runs in fp32 otherwise."""
    import warnings
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():  # PyTorch announces a move of quantization to torchao; the API still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def translate(model, sources, sos_id, eos_id, beam=1, alpha=0.6, max_len_a=1.2, max_len_b=10, max_len=0,
              max_tokens=6000, use_cache=True):
    """Translate token-id lists (no specials; EOS is appended as in training), returning token-id lists in
    input order. Sentences run in length-sorted batches of about max_tokens source tokens (x beam), so short
    sentences decode in large batches. beam=1 is greedy search. Autocast, if any, is the caller's."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
    batches, batch = [], []
    for i in order:
        if batch and (len(batch) + 1) * (len(sources[batch[0]]) + 1) * beam > max_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    batches += [batch] if batch else []
    results = [None] * len(sources)
    was_training = model.training
    model.eval()
    for batch in batches:
        src = torch.full((len(batch), len(sources[batch[0]]) + 1), model.pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            src[row, :len(sources[i]) + 1] = torch.tensor(sources[i] + [eos_id])
        src = src.to(device)
        limits = dict(max_len_a=max_len_a, max_len_b=max_len_b, max_len=max_len)
        if beam == 1:
            outputs = greedy_search(model, src, sos_id, eos_id, use_cache=use_cache, **limits)
        else:
            outputs = beam_search(model, src, sos_id, eos_id, beam, alpha, use_cache=use_cache, **limits)
        for i, output in zip(batch, outputs):
            results[i] = output
    model.train(was_training)
    return results
