// Paged-KV block manager: see block_manager.h, and arpo/engine/block_manager_py.py for the rules in prose.
// Every public method validates and checks capacity before it mutates anything.
#include "block_manager.h"

#include <algorithm>

namespace arpo {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string unknown_message(const char* op, int64_t seq_id) {
  return std::string(op) + ": unknown sequence id " + std::to_string(seq_id) +
         " (never allocated, or already freed)";
}

void check_n(const char* op, int64_t n) {
  if (n < 0) {
    throw Error(Error::Kind::kInvalidArgument, std::string(op) + ": n=" + std::to_string(n) + " must be >= 0");
  }
}

}  // namespace

uint64_t chain_hash(uint64_t prev, const int64_t* tokens, size_t n) {
  uint64_t h = prev;
  for (size_t i = 0; i < n; ++i) {
    h = (h ^ static_cast<uint64_t>(tokens[i])) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 32;
  }
  h ^= h >> 30;  // splitmix64 finaliser
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBULL;
  return h ^ (h >> 31);
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), caching_(enable_prefix_caching) {
  if (num_blocks <= 0) {
    throw Error(Error::Kind::kInvalidArgument, "num_blocks=" + std::to_string(num_blocks) + " must be > 0");
  }
  if (block_size <= 0) {
    throw Error(Error::Kind::kInvalidArgument, "block_size=" + std::to_string(block_size) + " must be > 0");
  }
  blocks_.resize(num_blocks);
  free_pos_.resize(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) free_pos_[b] = free_.insert(free_.end(), b);
}

// ---- queries ------------------------------------------------------------------------------------------------

std::vector<int64_t> BlockManager::seq_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::vector<int64_t> BlockManager::block_table(int64_t seq_id) const { return get("block_table", seq_id).table; }

int64_t BlockManager::num_tokens(int64_t seq_id) const { return get("num_tokens", seq_id).num_tokens; }

int64_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw Error(Error::Kind::kInvalidArgument, "ref_count: block id " + std::to_string(block_id) +
                                                   " is outside [0, " + std::to_string(num_blocks()) + ")");
  }
  return blocks_[block_id].ref_count;
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) {
    throw Error(Error::Kind::kInvalidArgument,
                "can_allocate: num_tokens=" + std::to_string(num_tokens) + " must be >= 0");
  }
  return cdiv(num_tokens, block_size_) <= num_free_blocks();
}

bool BlockManager::can_append(int64_t seq_id, int64_t n) const {
  const Sequence& seq = get("can_append", seq_id);
  check_n("can_append", n);
  return append_cost(seq, n) <= num_free_blocks();
}

// ---- actions ------------------------------------------------------------------------------------------------

int64_t BlockManager::allocate(int64_t seq_id, const std::vector<int64_t>& token_ids) {
  if (has(seq_id)) {
    throw Error(Error::Kind::kDuplicateSequence,
                "allocate: sequence id " + std::to_string(seq_id) + " already exists");
  }
  const int64_t n = static_cast<int64_t>(token_ids.size()), bs = block_size_;
  std::vector<uint64_t> hashes;
  if (caching_) hashes = hash_blocks(kRootHash, token_ids, 0, n / bs);
  std::vector<int64_t> hits;
  const int64_t lookups = (caching_ && n > 0) ? (n - 1) / bs : 0;  // never the block with the last token
  for (int64_t i = 0; i < lookups; ++i) {
    std::optional<int64_t> b = lookup(hashes[i], token_ids.data() + i * bs);
    if (!b) break;
    hits.push_back(*b);
  }
  int64_t need = cdiv(n, bs) - static_cast<int64_t>(hits.size());
  for (int64_t b : hits) need += blocks_[b].ref_count == 0 ? 1 : 0;
  check_free("allocate", seq_id, need);

  Sequence seq;
  for (int64_t b : hits) {
    if (blocks_[b].ref_count == 0) remove_free(b);
    blocks_[b].ref_count += 1;
    seq.table.push_back(b);
  }
  for (int64_t i = static_cast<int64_t>(hits.size()); i < cdiv(n, bs); ++i) {
    int64_t b = take_free();
    seq.table.push_back(b);
    if (i < static_cast<int64_t>(hashes.size())) register_block(b, hashes[i], token_ids.data() + i * bs);
  }
  seq.num_tokens = n;
  if (caching_) seq.tokens = token_ids;
  seq.hashes = std::move(hashes);
  seqs_.emplace(seq_id, std::move(seq));
  return static_cast<int64_t>(hits.size()) * bs;
}

std::pair<std::vector<int64_t>, std::vector<BlockManager::Copy>> BlockManager::append(
    int64_t seq_id, int64_t n, const std::optional<std::vector<int64_t>>& token_ids) {
  Sequence& seq = get("append", seq_id);
  check_n("append", n);
  if (token_ids && static_cast<int64_t>(token_ids->size()) != n) {
    throw Error(Error::Kind::kInvalidArgument, "append: got " + std::to_string(token_ids->size()) +
                                                   " token ids for n=" + std::to_string(n));
  }
  std::vector<int64_t> slots;
  std::vector<Copy> copies;
  if (n == 0) return {slots, copies};
  check_free("append", seq_id, append_cost(seq, n));

  const int64_t bs = block_size_, start = seq.num_tokens;
  std::vector<int64_t>& table = seq.table;
  if (start % bs != 0) {  // the write starts inside the last block
    const int64_t last = table.back();
    if (blocks_[last].ref_count > 1) {
      const int64_t fresh = take_free();
      blocks_[last].ref_count -= 1;
      table.back() = fresh;
      copies.emplace_back(last, fresh);
    } else {
      unregister_block(last);
    }
  }
  for (int64_t k = cdiv(start + n, bs) - static_cast<int64_t>(table.size()); k > 0; --k) {
    table.push_back(take_free());
  }
  seq.num_tokens = start + n;
  slots.reserve(n);
  for (int64_t p = start; p < start + n; ++p) slots.push_back(table[p / bs] * bs + p % bs);

  if (caching_ && token_ids && static_cast<int64_t>(seq.tokens.size()) == start) {
    seq.tokens.insert(seq.tokens.end(), token_ids->begin(), token_ids->end());
    const int64_t first = static_cast<int64_t>(seq.hashes.size());
    const uint64_t prev = seq.hashes.empty() ? kRootHash : seq.hashes.back();
    std::vector<uint64_t> fresh = hash_blocks(prev, seq.tokens, first, seq.num_tokens / bs);
    for (size_t j = 0; j < fresh.size(); ++j) {
      const int64_t i = first + static_cast<int64_t>(j);
      seq.hashes.push_back(fresh[j]);
      register_block(table[i], fresh[j], seq.tokens.data() + i * bs);
    }
  }
  return {slots, copies};
}

std::vector<BlockManager::Copy> BlockManager::fork(int64_t parent_id, int64_t child_id,
                                                   std::optional<int64_t> at) {
  const Sequence& parent = get("fork", parent_id);
  if (has(child_id)) {
    throw Error(Error::Kind::kDuplicateSequence,
                "fork: sequence id " + std::to_string(child_id) + " already exists");
  }
  const int64_t cut = at.value_or(parent.num_tokens);
  if (cut < 0 || cut > parent.num_tokens) {
    throw Error(Error::Kind::kInvalidArgument,
                "fork: at=" + std::to_string(cut) + " is outside [0, " + std::to_string(parent.num_tokens) +
                    "] for parent sequence " + std::to_string(parent_id));
  }
  Sequence child;
  child.table.assign(parent.table.begin(), parent.table.begin() + cdiv(cut, block_size_));
  for (int64_t b : child.table) blocks_[b].ref_count += 1;
  child.num_tokens = cut;
  const size_t known = std::min(parent.tokens.size(), static_cast<size_t>(cut));
  child.tokens.assign(parent.tokens.begin(), parent.tokens.begin() + known);
  child.hashes.assign(parent.hashes.begin(), parent.hashes.begin() + known / block_size_);
  seqs_.emplace(child_id, std::move(child));  // may rehash: `parent` is not used after this
  return {};
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw Error(Error::Kind::kUnknownSequence, unknown_message("free", seq_id));
  const std::vector<int64_t>& table = it->second.table;
  for (auto b = table.rbegin(); b != table.rend(); ++b) release(*b);  // the tail is evicted first
  seqs_.erase(it);
}

// ---- internals ----------------------------------------------------------------------------------------------

const BlockManager::Sequence& BlockManager::get(const char* op, int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw Error(Error::Kind::kUnknownSequence, unknown_message(op, seq_id));
  return it->second;
}

BlockManager::Sequence& BlockManager::get(const char* op, int64_t seq_id) {
  return const_cast<Sequence&>(static_cast<const BlockManager*>(this)->get(op, seq_id));
}

void BlockManager::check_free(const char* op, int64_t seq_id, int64_t need) const {
  if (need > num_free_blocks()) {
    throw Error(Error::Kind::kOutOfBlocks, std::string(op) + ": sequence " + std::to_string(seq_id) +
                                               " needs " + std::to_string(need) + " free blocks but only " +
                                               std::to_string(num_free_blocks()) + " are free");
  }
}

int64_t BlockManager::append_cost(const Sequence& seq, int64_t n) const {
  if (n == 0) return 0;
  int64_t cost = cdiv(seq.num_tokens + n, block_size_) - static_cast<int64_t>(seq.table.size());
  if (seq.num_tokens % block_size_ != 0 && blocks_[seq.table.back()].ref_count > 1) cost += 1;  // copy-on-write
  return cost;
}

std::vector<uint64_t> BlockManager::hash_blocks(uint64_t prev, const std::vector<int64_t>& tokens, int64_t first,
                                                int64_t end) const {
  std::vector<uint64_t> out;
  for (int64_t i = first; i < end; ++i) {
    prev = chain_hash(prev, tokens.data() + i * block_size_, block_size_);
    out.push_back(prev);
  }
  return out;
}

std::optional<int64_t> BlockManager::lookup(uint64_t hash, const int64_t* tokens) const {
  auto it = index_.find(hash);
  if (it == index_.end()) return std::nullopt;
  const std::vector<int64_t>& stored = blocks_[it->second].tokens;
  if (!std::equal(stored.begin(), stored.end(), tokens)) return std::nullopt;
  return it->second;
}

int64_t BlockManager::take_free() {
  const int64_t b = free_.front();
  free_.pop_front();
  unregister_block(b);
  blocks_[b].ref_count = 1;
  return b;
}

void BlockManager::remove_free(int64_t b) { free_.erase(free_pos_[b]); }

void BlockManager::release(int64_t b) {
  if (--blocks_[b].ref_count == 0) free_pos_[b] = free_.insert(free_.end(), b);
}

void BlockManager::register_block(int64_t b, uint64_t hash, const int64_t* tokens) {
  if (!caching_) return;
  unregister_block(b);
  auto it = index_.find(hash);
  if (it != index_.end() && it->second != b) {  // the newest copy wins
    blocks_[it->second].has_hash = false;
    blocks_[it->second].tokens.clear();
  }
  index_[hash] = b;
  Block& block = blocks_[b];
  block.has_hash = true;
  block.hash = hash;
  block.tokens.assign(tokens, tokens + block_size_);
}

void BlockManager::unregister_block(int64_t b) {
  Block& block = blocks_[b];
  if (!block.has_hash) return;
  index_.erase(block.hash);
  block.has_hash = false;
  block.tokens.clear();
}

}  // namespace arpo
