#!/usr/bin/env python3
"""PyTorch reference for llara's sequential-recommender training speed.

LLaRA's SASRec / GRU4Rec / Caser (the DROS code LLaRA ships, reproduced verbatim in structure and
parameter names) trained with the same loop as `llara train-sr`: Adam (L2 weight decay 1e-4), lr 1e-3,
batch 256, dropout 0.1, BCE of the target's logit against one uniformly sampled negative.

Prints one JSON line: {"impl": "pytorch", "model": ..., "examples_per_second": ..., ...}.

    python3 scripts/reference/sr_torch.py --data runs/data/lastfm --model sasrec --threads 2 --epochs 2
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden_size, num_units, num_heads, dropout_rate):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.linear_q = nn.Linear(hidden_size, num_units)
        self.linear_k = nn.Linear(hidden_size, num_units)
        self.linear_v = nn.Linear(hidden_size, num_units)
        self.dropout = nn.Dropout(dropout_rate)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, queries, keys):
        Q = self.linear_q(queries)
        K = self.linear_k(keys)
        V = self.linear_v(keys)
        split_size = self.hidden_size // self.num_heads
        Q_ = torch.cat(torch.split(Q, split_size, dim=2), dim=0)
        K_ = torch.cat(torch.split(K, split_size, dim=2), dim=0)
        V_ = torch.cat(torch.split(V, split_size, dim=2), dim=0)
        matmul_output = torch.bmm(Q_, K_.transpose(1, 2)) / self.hidden_size ** 0.5
        key_mask = torch.sign(torch.abs(keys.sum(dim=-1))).repeat(self.num_heads, 1)
        key_mask_reshaped = key_mask.unsqueeze(1).repeat(1, queries.shape[1], 1)
        key_paddings = torch.ones_like(matmul_output) * (-2 ** 32 + 1)
        matmul_output_m1 = torch.where(torch.eq(key_mask_reshaped, 0), key_paddings, matmul_output)
        diag_vals = torch.ones_like(matmul_output[0, :, :])
        tril = torch.tril(diag_vals)
        causality_mask = tril.unsqueeze(0).repeat(matmul_output.shape[0], 1, 1)
        causality_paddings = torch.ones_like(causality_mask) * (-2 ** 32 + 1)
        matmul_output_m2 = torch.where(torch.eq(causality_mask, 0), causality_paddings, matmul_output_m1)
        matmul_output_sm = self.softmax(matmul_output_m2)
        query_mask = torch.sign(torch.abs(queries.sum(dim=-1))).repeat(self.num_heads, 1)
        query_mask = query_mask.unsqueeze(-1).repeat(1, 1, keys.shape[1])
        matmul_output_qm = matmul_output_sm * query_mask
        matmul_output_dropout = self.dropout(matmul_output_qm)
        output_ws = torch.bmm(matmul_output_dropout, V_)
        output = torch.cat(torch.split(output_ws, output_ws.shape[0] // self.num_heads, dim=0), dim=2)
        return output + queries


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_in, d_hid, dropout=0.1):
        super().__init__()
        self.w_1 = nn.Conv1d(d_in, d_hid, 1)
        self.w_2 = nn.Conv1d(d_hid, d_in, 1)
        self.layer_norm = nn.LayerNorm(d_in)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        residual = x
        output = x.transpose(1, 2)
        output = self.w_2(F.relu(self.w_1(output)))
        output = output.transpose(1, 2)
        output = self.dropout(output)
        return self.layer_norm(output + residual)


def extract_axis_1(data, indices):
    # LLaRA loops over rows in Python here; a vectorised gather gives PyTorch its best speed.
    idx = indices.view(-1, 1, 1).expand(-1, 1, data.shape[2])
    return torch.gather(data, 1, idx)


class SASRec(nn.Module):
    def __init__(self, hidden_size, item_num, state_size, dropout, num_heads=1):
        super().__init__()
        self.state_size = state_size
        self.item_num = int(item_num)
        self.item_embeddings = nn.Embedding(item_num + 1, hidden_size)
        nn.init.normal_(self.item_embeddings.weight, 0, 1)
        self.positional_embeddings = nn.Embedding(state_size, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(hidden_size)
        self.ln_2 = nn.LayerNorm(hidden_size)
        self.ln_3 = nn.LayerNorm(hidden_size)
        self.mh_attn = MultiHeadAttention(hidden_size, hidden_size, num_heads, dropout)
        self.feed_forward = PositionwiseFeedForward(hidden_size, hidden_size, dropout)
        self.s_fc = nn.Linear(hidden_size, item_num)

    def forward(self, states, len_states):
        inputs_emb = self.item_embeddings(states)
        inputs_emb += self.positional_embeddings(torch.arange(self.state_size))
        seq = self.emb_dropout(inputs_emb)
        mask = torch.ne(states, self.item_num).float().unsqueeze(-1)
        seq *= mask
        seq_normalized = self.ln_1(seq)
        mh_attn_out = self.mh_attn(seq_normalized, seq)
        ff_out = self.feed_forward(self.ln_2(mh_attn_out))
        ff_out *= mask
        ff_out = self.ln_3(ff_out)
        state_hidden = extract_axis_1(ff_out, len_states - 1)
        return self.s_fc(state_hidden).squeeze()


class GRU(nn.Module):
    def __init__(self, hidden_size, item_num, state_size, gru_layers=1):
        super().__init__()
        self.item_num = item_num
        self.item_embeddings = nn.Embedding(item_num + 1, hidden_size)
        nn.init.normal_(self.item_embeddings.weight, 0, 0.01)
        self.gru = nn.GRU(input_size=hidden_size, hidden_size=hidden_size, num_layers=gru_layers, batch_first=True)
        self.s_fc = nn.Linear(hidden_size, item_num)

    def forward(self, states, len_states):
        emb = self.item_embeddings(states)
        emb_packed = torch.nn.utils.rnn.pack_padded_sequence(emb, len_states, batch_first=True, enforce_sorted=False)
        emb_packed, hidden = self.gru(emb_packed)
        hidden = hidden.view(-1, hidden.shape[2])
        return self.s_fc(hidden)


class Caser(nn.Module):
    def __init__(self, hidden_size, item_num, state_size, num_filters, filter_sizes, dropout_rate):
        super().__init__()
        self.hidden_size = hidden_size
        self.item_num = int(item_num)
        self.filter_sizes = filter_sizes
        self.num_filters = num_filters
        self.item_embeddings = nn.Embedding(item_num + 1, hidden_size)
        nn.init.normal_(self.item_embeddings.weight, 0, 0.01)
        self.horizontal_cnn = nn.ModuleList([nn.Conv2d(1, num_filters, (i, hidden_size)) for i in filter_sizes])
        for cnn in self.horizontal_cnn:
            nn.init.xavier_normal_(cnn.weight)
            nn.init.constant_(cnn.bias, 0.1)
        self.vertical_cnn = nn.Conv2d(1, 1, (state_size, 1))
        nn.init.xavier_normal_(self.vertical_cnn.weight)
        nn.init.constant_(self.vertical_cnn.bias, 0.1)
        self.num_filters_total = num_filters * len(filter_sizes)
        self.s_fc = nn.Linear(hidden_size + self.num_filters_total, item_num)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, states, len_states):
        input_emb = self.item_embeddings(states)
        mask = torch.ne(states, self.item_num).float().unsqueeze(-1)
        input_emb *= mask
        input_emb = input_emb.unsqueeze(1)
        pooled_outputs = []
        for cnn in self.horizontal_cnn:
            h_out = F.relu(cnn(input_emb)).squeeze(-1)
            p_out = F.max_pool1d(h_out, h_out.shape[2])
            pooled_outputs.append(p_out)
        h_pool_flat = torch.cat(pooled_outputs, 1).view(-1, self.num_filters_total)
        v_flat = F.relu(self.vertical_cnn(input_emb)).view(-1, self.hidden_size)
        out = self.dropout(torch.cat([h_pool_flat, v_flat], 1))
        return self.s_fc(out)


def load_rows(path, min_history):
    rows = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if len(r["history"]) >= min_history:
                rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a llara dataset folder")
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "gru4rec", "caser"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--save", help="write the weights after every epoch to SAVE-eN.safetensors (+ .json), "
                    "PyTorch names, so that `llara eval-sr --model SAVE-eN.safetensors` scores them")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    meta = json.load(open(f"{a.data}/meta.json"))
    n = meta["n_items"]
    rows = load_rows(f"{a.data}/train.jsonl", 0)
    T = 10
    seq = torch.full((len(rows), T), n, dtype=torch.long)
    lens = torch.zeros(len(rows), dtype=torch.long)
    target = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        h = r["history"][-T:]
        seq[i, : len(h)] = torch.tensor(h, dtype=torch.long)
        lens[i] = len(h)
        target[i] = r["next"]
    if a.model == "sasrec":
        model = SASRec(64, n, T, 0.1)
    elif a.model == "gru4rec":
        model = GRU(64, n, T)
    else:
        model = Caser(64, n, T, 16, [2, 3, 4], 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=1e-4)
    bce = nn.BCEWithLogitsLoss()
    model.train()
    examples = 0
    losses = []
    start = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        perm = torch.randperm(len(rows))
        for b in range(0, len(rows), a.batch_size):
            idx = perm[b : b + a.batch_size]
            s, l, t = seq[idx], lens[idx], target[idx]
            neg = torch.randint(0, n, t.shape)
            out = model(s, l)
            pos_scores = torch.gather(out, 1, t.unsqueeze(1))
            neg_scores = torch.gather(out, 1, neg.unsqueeze(1))
            loss = bce(pos_scores, torch.ones_like(pos_scores)) + bce(neg_scores, torch.zeros_like(neg_scores))
            opt.zero_grad()
            loss.backward()
            opt.step()
            examples += len(idx)
            losses.append(loss.item())
        if a.save:
            from safetensors.torch import save_file
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, f"{a.save}-e{epoch}.safetensors")
            cfg = {"model": a.model, "item_num": n, "hidden_size": 64, "state_size": T, "padding_item_id": n,
                   "num_heads": 1, "dropout": 0.1, "num_filters": 16, "filter_sizes": [2, 3, 4]}
            json.dump(cfg, open(f"{a.save}-e{epoch}.json", "w"))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "model": a.model, "data": a.data,
        "threads": a.threads, "batch_size": a.batch_size, "examples": examples, "seconds": seconds,
        "examples_per_second": examples / seconds, "first_loss": losses[0], "last_loss": losses[-1],
    }))


if __name__ == "__main__":
    main()
