// Byte-level text data for the LM: a file split into a training and a held-out part; the training
// part is cut into D contiguous shards, one per local group in the whole job (D = ranks x groups),
// so each data-parallel rank reads only its own shards — and a 1-rank run with G = D groups sees
// exactly the same data as the D-group distributed run. Positions are drawn from
// (seed, step, global token index), never from a stream.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "runtime/train/byte_lm.h"

namespace moe {

class TextData {
 public:
  // Reads `path`; needs at least (context + 2) bytes per shard and in the held-out part.
  static StatusOr<TextData> Load(const std::string& path, double eval_fraction, int context,
                                 int num_shards);

  // The batch of one rank: `tokens` tokens split into `groups` contiguous groups, group g of this
  // rank reading shard first_shard + g; token i has global index token_offset + i.
  LmBatch TrainBatch(uint64_t seed, uint64_t step, int64_t token_offset, int64_t tokens,
                     int first_shard, int groups) const;
  // A deterministic held-out batch (same for every call with the same arguments).
  LmBatch EvalBatch(uint64_t seed, int64_t token_offset, int64_t tokens) const;

  int64_t train_bytes() const { return train_end_; }
  int64_t eval_bytes() const { return static_cast<int64_t>(bytes_.size()) - train_end_; }

 private:
  void Fill(int64_t begin, int64_t end, uint64_t h, LmBatch* b, int64_t i) const;

  std::string bytes_;
  int64_t train_end_ = 0;
  int context_ = 0;
  int num_shards_ = 1;
};

}  // namespace moe
