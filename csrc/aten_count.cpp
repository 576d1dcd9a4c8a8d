// Counting ATen operator calls: the events torch.profiler records, through the same RecordFunction hooks.

#include "shim.h"

#include <ATen/record_function.h>

using namespace darts_shim;

namespace {
std::atomic<int64_t> aten_calls{0};
at::CallbackHandle aten_counter = 0;
// Calls per operator name, kept only when counting was started with names (darts_count_aten_start(1)).
std::atomic<bool> aten_by_name{false};
std::mutex aten_names_mutex;
std::unordered_map<std::string, int64_t> aten_names;
std::string aten_names_text;
}  // namespace

extern "C" {

// Starts counting calls of aten:: operators on every thread (nested calls of composite operators included, the
// autograd engine's backward nodes not: they are not aten:: operators), as torch.profiler lists them. Returns 0 or -1.
// With `by_name`, also counts each operator's calls (darts_count_aten_names lists them).
int darts_count_aten_start(int by_name) {
  return guarded([&] {
    if (aten_counter != 0) {
      at::removeCallback(aten_counter);
    }
    aten_calls = 0;
    {
      std::lock_guard<std::mutex> lock(aten_names_mutex);
      aten_names.clear();
    }
    aten_by_name = by_name != 0;
    auto cb = at::RecordFunctionCallback(
                  [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
                    if (std::strncmp(fn.name(), "aten::", 6) == 0) {
                      aten_calls.fetch_add(1, std::memory_order_relaxed);
                      if (aten_by_name.load(std::memory_order_relaxed)) {
                        std::lock_guard<std::mutex> lock(aten_names_mutex);
                        aten_names[fn.name()] += 1;
                      }
                    }
                    return nullptr;
                  })
                  .scopes({at::RecordScope::FUNCTION});
    aten_counter = at::addGlobalCallback(std::move(cb));
    return 0;
  });
}

// Stops counting and returns the number of calls since darts_count_aten_start.
int64_t darts_count_aten_stop() {
  if (aten_counter != 0) {
    at::removeCallback(aten_counter);
    aten_counter = 0;
  }
  return aten_calls.load();
}

// The calls per operator name of the last count started with names, as lines "count name", most called first.
// The text stays valid until the next call.
const char* darts_count_aten_names() {
  std::lock_guard<std::mutex> lock(aten_names_mutex);
  std::vector<std::pair<int64_t, std::string>> rows;
  for (const auto& kv : aten_names) rows.emplace_back(kv.second, kv.first);
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  aten_names_text.clear();
  for (const auto& r : rows) aten_names_text += std::to_string(r.first) + " " + r.second + "\n";
  return aten_names_text.c_str();
}

}  // extern "C"
