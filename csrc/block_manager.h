// Paged-KV block manager with prefix caching, fork and copy-on-write (C++17, no Python dependency).
//
// This is the fast twin of arpo/engine/block_manager_py.py; both follow the same rules step by step (the
// Python module docstring states them) so that any sequence of calls gives identical block tables, slots,
// copies and errors. Bindings live in bindings.cpp, which maps `Error::Kind` onto arpo/engine/errors.py.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace arpo {

// Thrown before any state changes; `kind` selects the Python exception class.
class Error : public std::runtime_error {
 public:
  enum class Kind { kOutOfBlocks, kUnknownSequence, kDuplicateSequence, kInvalidArgument };
  Error(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

constexpr uint64_t kRootHash = 0xCBF29CE484222325ULL;  // "previous hash" of a sequence's first block

// 64-bit hash of one block's tokens chained on the previous block's hash (same function as the Python twin).
uint64_t chain_hash(uint64_t prev, const int64_t* tokens, size_t n);

class BlockManager {
 public:
  using Copy = std::pair<int64_t, int64_t>;  // (src block, dst block)

  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  bool enable_prefix_caching() const { return caching_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }

  bool has(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  std::vector<int64_t> seq_ids() const;
  std::vector<int64_t> block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  int64_t ref_count(int64_t block_id) const;
  bool can_allocate(int64_t num_tokens) const;
  bool can_append(int64_t seq_id, int64_t n) const;

  // Returns the number of leading tokens already cached (a multiple of block_size, < len(token_ids)).
  int64_t allocate(int64_t seq_id, const std::vector<int64_t>& token_ids);
  // Returns the slots to write and the (src, dst) block copies to perform before writing.
  std::pair<std::vector<int64_t>, std::vector<Copy>> append(
      int64_t seq_id, int64_t n, const std::optional<std::vector<int64_t>>& token_ids);
  // Shares the parent's first `at` tokens (default all); copies nothing, so the result is always empty.
  std::vector<Copy> fork(int64_t parent_id, int64_t child_id, std::optional<int64_t> at);
  void free(int64_t seq_id);

 private:
  struct Block {
    int64_t ref_count = 0;
    bool has_hash = false;         // true iff the prefix index maps `hash` to this block
    uint64_t hash = 0;
    std::vector<int64_t> tokens;   // the block's tokens while registered, to verify hits
  };
  struct Sequence {
    std::vector<int64_t> table;
    int64_t num_tokens = 0;
    std::vector<int64_t> tokens;   // known leading token ids
    std::vector<uint64_t> hashes;  // chain hash of each full block inside `tokens`
  };

  const Sequence& get(const char* op, int64_t seq_id) const;
  Sequence& get(const char* op, int64_t seq_id);
  void check_free(const char* op, int64_t seq_id, int64_t need) const;
  int64_t append_cost(const Sequence& seq, int64_t n) const;
  std::vector<uint64_t> hash_blocks(uint64_t prev, const std::vector<int64_t>& tokens, int64_t first,
                                    int64_t end) const;
  std::optional<int64_t> lookup(uint64_t hash, const int64_t* tokens) const;
  int64_t take_free();          // pops the queue front, evicts its cached prefix, ref_count = 1
  void remove_free(int64_t b);  // takes a cached free block out of the middle of the queue
  void release(int64_t b);      // ref_count - 1; joins the queue back at 0
  void register_block(int64_t b, uint64_t hash, const int64_t* tokens);
  void unregister_block(int64_t b);

  int64_t block_size_;
  bool caching_;
  std::vector<Block> blocks_;
  std::list<int64_t> free_;                              // FIFO queue of free block ids
  std::vector<std::list<int64_t>::iterator> free_pos_;   // each free block's place in `free_`
  std::unordered_map<uint64_t, int64_t> index_;          // chain hash -> block id
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace arpo
