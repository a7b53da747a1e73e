#include "engine/infer/batch_scheduler.h"

#include <algorithm>
#include <map>
#include <set>

namespace lorad::engine {
namespace {

// The plan under construction and the resources it has used so far.
struct Budget {
  const KvBlockAllocator& kv;
  const SchedulerLimits& limits;
  int32_t free_blocks;
  int64_t tokens_left;
  std::set<std::string> adapters;  // distinct non-base adapters in the batch

  // Blocks `seq` needs beyond what it holds to have `tokens` tokens cached.
  int32_t ExtraBlocks(const ScheduledSequence& seq, int64_t tokens) const {
    return kv.ExtraBlocksFor(seq.id, tokens);
  }
};

// Admission rules, one predicate each.
bool FitsRunningLimit(size_t running, const SchedulerLimits& limits) {
  return static_cast<int32_t>(running) < limits.max_running;
}
bool FitsTokenBudget(const Budget& b, int64_t tokens) {
  return tokens > 0 && tokens <= b.tokens_left;
}
bool FitsKvCache(const Budget& b, const ScheduledSequence& seq) {
  // The whole prompt plus the first generated token must fit, so an admitted request never
  // stalls half-way through its prefill.
  return b.ExtraBlocks(seq, seq.prompt_tokens + 1) <= b.free_blocks;
}
bool FitsAdapterLimit(const Budget& b, const std::string& adapter) {
  return adapter.empty() || b.adapters.count(adapter) > 0 ||
         static_cast<int32_t>(b.adapters.size()) < b.limits.max_adapters_per_batch;
}

// `waiting` in the order admission considers it (the header's rule 3): preempted requests, then
// those passed over `max_passed_over` times (their turn, whatever their client's share), then
// by share.
std::vector<const ScheduledSequence*> AdmissionOrder(
    const std::vector<const ScheduledSequence*>& running,
    const std::vector<ScheduledSequence>& waiting, const SchedulerLimits& limits) {
  std::map<std::string, int64_t> load;  // a client's running requests, then those before
  for (const ScheduledSequence* seq : running) ++load[seq->client];
  std::vector<std::pair<int64_t, const ScheduledSequence*>> keyed;
  for (const auto& seq : waiting) {
    const int64_t share = load[seq.client]++;
    const int64_t key = seq.preempted ? -2 : seq.passed_over >= limits.max_passed_over ? -1 : share;
    keyed.emplace_back(key, &seq);
  }
  std::stable_sort(keyed.begin(), keyed.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<const ScheduledSequence*> order;
  for (const auto& [share, seq] : keyed) order.push_back(seq);
  return order;
}

int64_t ChunkFor(const Budget& b, const ScheduledSequence& seq) {
  const int64_t remaining = seq.prompt_tokens - seq.computed_tokens;
  return std::min({remaining, b.limits.prefill_chunk, b.tokens_left});
}

}  // namespace

StepPlan PlanStep(const std::vector<ScheduledSequence>& running,
                  const std::vector<ScheduledSequence>& waiting, const KvBlockAllocator& kv,
                  const SchedulerLimits& limits) {
  StepPlan plan;
  Budget b{kv, limits, kv.free_blocks(), limits.token_budget, {}};

  // 1. Decode, preempting from the back (latest arrival) when a token does not fit.
  std::vector<const ScheduledSequence*> active;
  for (const auto& seq : running) active.push_back(&seq);
  std::vector<const ScheduledSequence*> kept;
  while (!active.empty()) {
    const ScheduledSequence& seq = *active.front();
    const bool decoding = seq.computed_tokens >= seq.prompt_tokens;
    const int64_t target = decoding ? seq.computed_tokens + 1 : seq.computed_tokens;
    int32_t need = b.ExtraBlocks(seq, target);
    while (need > b.free_blocks && active.size() > 1) {
      const ScheduledSequence& victim = *active.back();
      plan.preempted.push_back(victim.id);
      b.free_blocks += static_cast<int32_t>(kv.BlockTable(victim.id).size());
      active.pop_back();
    }
    if (need > b.free_blocks) {  // alone and still too big: it must wait for memory too
      plan.preempted.push_back(seq.id);
      b.free_blocks += static_cast<int32_t>(kv.BlockTable(seq.id).size());
      active.erase(active.begin());
      continue;
    }
    b.free_blocks -= need;
    kept.push_back(&seq);
    if (!seq.adapter.empty()) b.adapters.insert(seq.adapter);
    if (decoding && b.tokens_left > 0) {
      plan.decode.push_back(seq.id);
      --b.tokens_left;
    }
    active.erase(active.begin());
  }
  // Preempted sequences go back in arrival order.
  std::reverse(plan.preempted.begin(), plan.preempted.end());

  // 2. Continue chunked prefills of running sequences.
  for (const ScheduledSequence* seq : kept) {
    if (seq->computed_tokens >= seq->prompt_tokens) continue;
    const int64_t chunk = ChunkFor(b, *seq);
    if (chunk <= 0) continue;
    const int32_t need = b.ExtraBlocks(*seq, seq->computed_tokens + chunk);
    if (need > b.free_blocks) continue;
    b.free_blocks -= need;
    b.tokens_left -= chunk;
    plan.prefill.emplace_back(seq->id, chunk);
  }

  // 3. Admit waiting requests (none while anything was just preempted: memory is short).
  size_t running_count = kept.size();
  if (plan.preempted.empty()) {
    // Passed over: skipped for the adapter limit, or, first of its client's waiting requests,
    // left waiting while a request that arrived after it was admitted (a lighter client's). At
    // max_passed_over it comes first and holds the line until it fits, so neither traffic on
    // other adapters nor other clients' requests starve it. (Counted against every waiting
    // request, a burst's whole backlog came first after 64 steps, and the lighter clients
    // waited behind all of it again.)
    std::vector<bool> skipped(waiting.size(), false), admitted(waiting.size(), false);
    size_t admitted_up_to = 0;  // 1 + the arrival index of the latest arrival admitted
    for (const ScheduledSequence* next : AdmissionOrder(kept, waiting, limits)) {
      const ScheduledSequence& seq = *next;
      const size_t arrival = static_cast<size_t>(next - waiting.data());
      if (!FitsRunningLimit(running_count, limits)) break;
      const int64_t chunk = ChunkFor(b, seq);
      if (!FitsTokenBudget(b, chunk)) break;
      if (!FitsKvCache(b, seq)) break;  // first in line and too large: it holds the line
      if (!FitsAdapterLimit(b, seq.adapter)) {
        if (seq.passed_over >= limits.max_passed_over) break;  // its turn: the others wait
        skipped[arrival] = true;
        continue;
      }
      b.free_blocks -= b.ExtraBlocks(seq, seq.prompt_tokens + 1);
      b.tokens_left -= chunk;
      if (!seq.adapter.empty()) b.adapters.insert(seq.adapter);
      plan.admitted.push_back(seq.id);
      plan.prefill.emplace_back(seq.id, chunk);
      ++running_count;
      admitted[arrival] = true;
      admitted_up_to = std::max(admitted_up_to, arrival + 1);
    }
    std::set<std::string> clients_seen;
    for (size_t i = 0; i < waiting.size(); ++i) {
      if (admitted[i]) continue;
      const bool first_of_client = clients_seen.insert(waiting[i].client).second;
      if (skipped[i] || (first_of_client && i + 1 < admitted_up_to)) {
        plan.passed_over.push_back(waiting[i].id);
      }
    }
  }
  plan.tokens = limits.token_budget - b.tokens_left;
  return plan;
}

}  // namespace lorad::engine
