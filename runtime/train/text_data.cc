// The training text, its shards and held-out part (runtime/train/text_data.h).
#include "runtime/train/text_data.h"

#include "base/file.h"
#include "base/rng.h"

namespace moe {

StatusOr<TextData> TextData::Load(const std::string& path, double eval_fraction, int context,
                                  int num_shards) {
  TextData d;
  MOE_ASSIGN_OR_RETURN(d.bytes_, ReadFileToString(path));
  const int64_t n = static_cast<int64_t>(d.bytes_.size());
  d.context_ = context;
  d.num_shards_ = num_shards;
  d.train_end_ = n - static_cast<int64_t>(static_cast<double>(n) * eval_fraction);
  const int64_t need = static_cast<int64_t>(context + 2);
  if (d.train_end_ / num_shards < need) {
    return InvalidArgument("train.data_path=" + path + " has " + std::to_string(d.train_end_) +
                           " training bytes; " + std::to_string(num_shards) +
                           " shards of model.context+2=" + std::to_string(need) +
                           " bytes each need at least " + std::to_string(need * num_shards));
  }
  if (eval_fraction > 0 && n - d.train_end_ < need) {
    return InvalidArgument("train.data_path=" + path + " leaves " + std::to_string(n - d.train_end_) +
                           " held-out bytes with train.eval_fraction=" + std::to_string(eval_fraction) +
                           ", need at least model.context+2=" + std::to_string(need));
  }
  return d;
}

void TextData::Fill(int64_t begin, int64_t end, uint64_t h, LmBatch* b, int64_t i) const {
  // A position p in [begin + context, end): context = bytes[p - context, p), target = bytes[p].
  const int64_t span = end - begin - context_;
  const int64_t p = begin + context_ + static_cast<int64_t>(h % static_cast<uint64_t>(span));
  for (int j = 0; j < context_; ++j) {
    b->context_bytes[static_cast<size_t>(i * context_ + j)] =
        static_cast<uint8_t>(bytes_[static_cast<size_t>(p - context_ + j)]);
  }
  b->targets[static_cast<size_t>(i)] = static_cast<uint8_t>(bytes_[static_cast<size_t>(p)]);
}

LmBatch TextData::TrainBatch(uint64_t seed, uint64_t step, int64_t token_offset, int64_t tokens,
                             int first_shard, int groups) const {
  LmBatch b;
  b.tokens = tokens;
  b.context = context_;
  b.context_bytes.resize(static_cast<size_t>(tokens * context_));
  b.targets.resize(static_cast<size_t>(tokens));
  // Same group split as the dispatch plan: the first tokens % groups groups hold one more.
  const int64_t q = tokens / groups, r = tokens % groups;
  int64_t i = 0;
  for (int g = 0; g < groups; ++g) {
    const int shard = first_shard + g;
    const int64_t begin = train_end_ * shard / num_shards_;
    const int64_t end = train_end_ * (shard + 1) / num_shards_;
    const int64_t n = q + (g < r ? 1 : 0);
    for (int64_t k = 0; k < n; ++k, ++i) {
      Fill(begin, end, CounterHash(seed, step, static_cast<uint64_t>(token_offset + i), RngStream::kData), &b, i);
    }
  }
  return b;
}

LmBatch TextData::EvalBatch(uint64_t seed, int64_t token_offset, int64_t tokens) const {
  LmBatch b;
  b.tokens = tokens;
  b.context = context_;
  b.context_bytes.resize(static_cast<size_t>(tokens * context_));
  b.targets.resize(static_cast<size_t>(tokens));
  const int64_t begin = eval_bytes() >= context_ + 2 ? train_end_ : 0;
  const int64_t end = eval_bytes() >= context_ + 2 ? static_cast<int64_t>(bytes_.size()) : train_end_;
  for (int64_t i = 0; i < tokens; ++i) {
    Fill(begin, end, CounterHash(seed, 0, static_cast<uint64_t>(token_offset + i), RngStream::kEval), &b, i);
  }
  return b;
}

}  // namespace moe
