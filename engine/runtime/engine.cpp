#include "engine/runtime/engine.h"

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/checkpointed_call.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_weights.h"
#include "engine/model/tokenizer.h"
#include "engine/runtime/training_credit.h"
#include "engine/train/trainer.h"
#include "engine/train/training_memory.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace lorad::engine {
namespace {

// Hands heap a job freed (its tokenized dataset: gigabytes for a large one) back to the system:
// glibc keeps freed heap for reuse, and a daemon up for weeks held its resident size near the
// largest dataset it ever trained, against a container's memory limit and the CPU planner's
// MemAvailable. On a thread of its own, one at a time: a trim walks every free chunk (a quarter
// of a second for 2 GB freed), which on the loop would pause every stream.
void ReturnFreedHeap() {
#if defined(__GLIBC__)
  static std::atomic<bool> trimming{false};
  if (trimming.exchange(true)) return;
  try {
    std::thread([] {
      malloc_trim(0);
      trimming = false;
    }).detach();
  } catch (const std::system_error&) {
    trimming = false;  // no thread to be had: the heap stays as it is
  }
#endif
}

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Device bytes a new allocation can still get: what the driver has free plus what torch's caching
// allocator holds but does not use. -1 on the CPU (no limit is checked there).
int64_t AvailableDeviceBytes(const DeviceInfo& device) {
#if defined(LORAD_WITH_CUDA)
  if (device.device == "cpu") return -1;
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return -1;
  const torch::Device d(device.device);
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.has_index() ? d.index() : 0);
  const auto& reserved = stats.reserved_bytes[0].current;
  const auto& allocated = stats.allocated_bytes[0].current;
  return static_cast<int64_t>(free) + std::max<int64_t>(0, reserved - allocated);
#else
  (void)device;
  return -1;
#endif
}

}  // namespace

struct Engine::Impl {
  EngineOptions options;
  DeviceInfo device;
  int64_t host_total_bytes = -1;  // TotalHostBytes() at start
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;  // nullopt when the model names none
  std::string chat_template_error;
  // The model folder's BOS/EOS tokens (tokenizer_config.json), written by a template a request
  // names as training writes them (nullopt: the family's usual ones).
  std::optional<std::string> bos_token, eos_token;
  std::string base_fingerprint;  // ModelFolderFingerprint of the model folder at start
  std::unique_ptr<AdapterStore> adapters;
  std::unique_ptr<InferenceEngine> inference;

  // Loop state. `mu` guards the wake-up flags and the training hand-over; the trainer itself is
  // touched by the loop thread only (Cancel is thread-safe by the Trainer's contract).
  mutable std::mutex mu;
  std::condition_variable wake;
  bool stop = false;
  bool pending_work = false;
  bool adapter_retired = false;  // the store retired a version since the loop last looked
  // StopTraining: asked, then done (the loop checkpointed and ended every job; no more start).
  bool stop_training = false;
  bool training_stopped = false;
  std::condition_variable training_stopped_cv;
  // A job's data is read and tokenized on a thread of its own (Trainer::PrepareData: seconds for
  // a large dataset, which on the loop thread would stall every stream); the job then waits in
  // pending_jobs for the loop to build its trainer.
  struct PendingJob {
    std::string id;
    TrainingJobConfig config;
    TrainingEventCallback on_event;
    absl::StatusOr<std::shared_ptr<Trainer::PreparedData>> prepared;
  };
  std::deque<PendingJob> pending_jobs;
  struct Preparation {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> abandon;  // a cancel, StopTraining or Stop
  };
  std::map<std::string, Preparation> preparations;  // by job id, until the loop takes the job
  std::vector<std::string> active_job_ids;          // from hand-over until each job's last event
  std::map<std::string, int64_t> job_bytes;         // each active job's estimated memory
  std::map<std::string, int64_t> job_host_bytes;    // and its pinned host memory (CUDA)
  std::set<std::string> cancel_job_ids;  // cancels that arrived before the loop took the job
  struct ActiveTrainer {
    std::string id;
    std::unique_ptr<Trainer> trainer;
    bool offloads = false;  // its checkpointed layer inputs wait in pinned host memory
  };
  std::vector<ActiveTrainer> trainers;  // the loop's; the vector itself changes under `mu`
  size_t next_trainer = 0;              // whose micro-batch is next
  // Every job waits for storage (a write failed) until trainers_idle_until: the loop sleeps
  // rather than spin. Under `mu`.
  bool trainers_idle = false;
  Clock::time_point trainers_idle_until;
  // Whether every job waits for storage now (the loop thread's view of its own trainers).
  bool AllTrainersWaiting() const {
    const Clock::time_point now = Clock::now();
    for (const ActiveTrainer& t : trainers) {
      const auto until = t.trainer->idle_until();
      if (!until || *until <= now) return false;
    }
    return !trainers.empty();
  }
  std::thread loop;

  std::atomic<double> train_seconds{0};
  std::atomic<double> inference_seconds{0};

  void Loop();
  void StopTrainers();
  void TakePendingJobs();
  // Whether a trainer was made for it (else it ended: failed, cancelled, refused).
  bool StartJob(PendingJob job);
  // Ends a job that never trained as cancelled (a cancel or a shutdown during its preparation).
  void EndUnstartedJob(const PendingJob& job);
  // Abandons every preparation and joins its thread (the loop thread or Stop; without mu).
  void JoinPreparations();
  // Runs the next job's micro-batch (one piece of work); false when every job waits for
  // storage (Trainer::idle_until), with the earliest time one may go on in *idle_until.
  bool RunTrainingMicroBatch(Clock::time_point* idle_until = nullptr);
  void EndJob(const std::string& id) {  // under mu
    active_job_ids.erase(std::remove(active_job_ids.begin(), active_job_ids.end(), id),
                         active_job_ids.end());
    job_bytes.erase(id);
    job_host_bytes.erase(id);
  }
  // The estimate for a job on this device (bf16 on CUDA, fp32 on the CPU).
  TrainingMemoryEstimate Need(const TrainingJobConfig& config) const {
    return EstimateTrainingBytes(model->config(), config, device.device == "cpu" ? 4 : 2,
                                 model->PacksWithFlash());
  }
  // TrainingFitsNow's answer, under mu.
  // `waits_for` (optional): when it is false, what the job needs that the jobs training hold.
  absl::StatusOr<bool> FitsNow(const TrainingMemoryEstimate& need, const TrainingJobConfig& config,
                               std::string* waits_for = nullptr) const {
    int64_t held = 0, held_host = 0;
    for (const auto& [id, bytes] : job_bytes) held += bytes;
    for (const auto& [id, bytes] : job_host_bytes) held_host += bytes;
    return FitsBeside(need, config, held, held_host, waits_for);
  }
  // The same answer beside jobs holding `held` bytes of the budget and `held_host` of pinned
  // host memory (`waits_for` describes them as the jobs training).
  absl::StatusOr<bool> FitsBeside(const TrainingMemoryEstimate& need,
                                  const TrainingJobConfig& config, int64_t held, int64_t held_host,
                                  std::string* waits_for) const {
    // Offloading parks tensors in pinned host memory (CUDA only): a job that needs more than the
    // host has in all can never run, and one that needs more than the jobs training leave of it
    // waits for one to end. (What is available now is not asked: a job that just ended hands its
    // pinned blocks back only after its last event, and the next job is admitted on that event.)
    if (device.device == "cpu") {
      // The job's memory is the host's: one needing more than the host has in all was accepted
      // and then ended the daemon (the out-of-memory killer) when no budget was set.
      if (auto s = CpuTrainingMemoryFits(need, config, host_total_bytes); !s.ok()) return s;
    } else {
      absl::StatusOr<bool> host_fits =
          PinnedHostMemoryFits(need, config, host_total_bytes, held_host);
      if (!host_fits.ok() || !*host_fits) {
        if (waits_for != nullptr) {
          *waits_for = "up to " + ReadableBytes(need.host_bytes) +
                       " of pinned host memory, and the jobs training hold " +
                       ReadableBytes(held_host) + " of the host's " +
                       ReadableBytes(host_total_bytes);
        }
        return host_fits;
      }
    }
    const int64_t budget = options.training_memory_budget_bytes;
    if (budget <= 0) return true;
    if (need.total() > budget) {
      return absl::ResourceExhaustedError(
          "the job needs " + DescribeTrainingNeed(need) + " of training memory but " +
          "training.memory_budget_mib allows " + ReadableBytes(budget) + "; raise the budget, or " +
          TrainingShrinkHint(config));
    }
    if (waits_for != nullptr) {
      *waits_for = DescribeTrainingNeed(need) + " of training memory, and the jobs training hold " +
                   ReadableBytes(held) + " of training.memory_budget_mib (" +
                   ReadableBytes(budget) + ")";
    }
    return need.total() <= budget - held;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() { Stop(); }

absl::StatusOr<std::unique_ptr<Engine>> Engine::Start(const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->device = DeviceInfo::Detect(options.device);
  impl->host_total_bytes = TotalHostBytes();
  if (auto s = CheckDeviceAvailable(options.device); !s.ok()) return s;
  if (!(options.train_share >= 0 && options.train_share <= 0.95)) {
    return absl::InvalidArgumentError("train_share must be in [0, 0.95]");
  }
  if (options.max_training_jobs < 1) {
    return absl::InvalidArgumentError("max_training_jobs must be at least 1");
  }
  if (options.training_memory_budget_bytes < 0) {
    return absl::InvalidArgumentError("training_memory_budget_bytes must be 0 (none) or more");
  }
  try {
    LlamaModelOptions model_options;
    const bool cuda = impl->device.device != "cpu";
    if (cuda) {
      model_options.device = torch::Device(impl->device.device);
      model_options.dtype = torch::kBFloat16;
    }
    auto base = BaseWeightsFromName(options.base_weights);
    if (!base.ok()) return base.status();
    model_options.base = *base;
    auto model = LlamaModel::Load(options.model_folder, model_options);
    if (!model.ok()) return model.status();
    impl->model = std::move(*model);

    auto tokenizer = LoadTokenizer(options.model_folder);
    if (!tokenizer.ok()) return tokenizer.status();
    impl->tokenizer = std::move(*tokenizer);
    auto fingerprint =
        ModelFolderFingerprint(options.model_folder, impl->model->weights_fingerprint());
    if (!fingerprint.ok()) return fingerprint.status();
    impl->base_fingerprint = *std::move(fingerprint);

    if (auto settings = TokenizerSettings::Load(options.model_folder); settings.ok()) {
      impl->bos_token = settings->bos_token;
      impl->eos_token = settings->eos_token;
    }
    auto chat = ChatTemplate::FromTokenizerConfig(options.model_folder, options.chat_template);
    if (chat.ok()) {
      impl->chat_template = std::move(*chat);
    } else if (!options.chat_template.empty()) {
      return chat.status();  // the operator named a template that does not exist
    } else {
      impl->chat_template_error = std::string(chat.status().message());
    }

    AdapterStoreOptions store_options;
    store_options.max_resident = options.max_resident_adapters;
    store_options.device = impl->device.device;
    store_options.dtype = cuda ? "bfloat16" : "float32";
    auto store = AdapterStore::Create(impl->model->config(), store_options);
    if (!store.ok()) return store.status();
    impl->adapters = std::move(*store);
    // A retired adapter version wakes the loop, which releases the inference engine's copy of
    // it unless a running request still uses it.
    Impl* owner = impl.get();
    impl->adapters->SetRetireListener([owner] {
      {
        std::lock_guard<std::mutex> lock(owner->mu);
        owner->pending_work = true;
        owner->adapter_retired = true;
      }
      owner->wake.notify_all();
    });

    // The KV cache is allocated whole: more than there is fails here with a clear message, not
    // with an allocator's error (CUDA) or the out-of-memory killer once its pages are touched.
    // A setting to change, so INVALID_ARGUMENT (the daemon exits 2, as for any bad config).
    const int64_t available = cuda ? AvailableDeviceBytes(impl->device) : AvailableHostBytes();
    if (options.inference.kv_cache_blocks == 0 && available >= 0 &&
        options.inference.kv_cache_bytes > available) {
      return absl::InvalidArgumentError(
          absl::StrCat("engine.kv_cache_bytes: ", ReadableBytes(options.inference.kv_cache_bytes),
                       " of KV cache is more than the ", ReadableBytes(available), " of ",
                       cuda ? "device" : "host", " memory left after loading the model; lower it"));
    }
    auto inference = InferenceEngine::Create(impl->model.get(), impl->tokenizer.get(),
                                             impl->adapters.get(), options.inference);
    if (!inference.ok()) return inference.status();
    impl->inference = std::move(*inference);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("loading ", options.model_folder, ": ", e.what()));
  }
  Impl* raw = impl.get();
  impl->loop = std::thread([raw] { raw->Loop(); });
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

void Engine::Stop() {
  if (!impl_ || !impl_->loop.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->wake.notify_all();
  impl_->training_stopped_cv.notify_all();  // a StopTraining waiting: the loop ends anyway
  impl_->loop.join();
  impl_->JoinPreparations();  // jobs still reading their data end with the engine, unreported
}

void Engine::Impl::Loop() {
  // Seconds of training the inference steps have earned (see the class comment).
  TrainingCredit credit(options.train_share);
  while (true) {
    bool retired = false;  // a retired adapter version woke it
    {
      std::unique_lock<std::mutex> lock(mu);
      auto ready = [&] {
        return stop || pending_work || !pending_jobs.empty() ||
               (!trainers.empty() && !trainers_idle) || inference->HasWork() ||
               (stop_training && !training_stopped && preparations.empty());
      };
      if (trainers_idle) {
        // Every job waits for storage: until the first may go on, or other work comes (a cancel
        // sets pending_work).
        wake.wait_until(lock, trainers_idle_until, ready);
        trainers_idle = false;
      } else {
        wake.wait(lock, ready);
      }
      retired = adapter_retired;
      adapter_retired = false;
      pending_work = false;
      if (stop) break;
    }
    bool stop_training_now = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      stop_training_now = stop_training && !training_stopped;
    }
    TakePendingJobs();
    if (stop_training_now) {
      StopTrainers();
      // Jobs still reading their data were told to stop (StopTraining); each ends unstarted once
      // it reaches the loop (StartJob), which serves meanwhile.
      bool stopped = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        stopped = training_stopped = preparations.empty() && pending_jobs.empty();
      }
      if (stopped) training_stopped_cv.notify_all();
    }
    const bool serving = inference->HasWork();
    if (retired) inference->ReleaseIdleAdapters();
    if (serving) {
      const Clock::time_point t0 = Clock::now();
      // A failed step finished its own requests with kError; the engine keeps serving.
      (void)inference->Step();
      const double dt = Seconds(Clock::now() - t0);
      inference_seconds.store(inference_seconds.load() + dt);
      if (!trainers.empty() && !AllTrainersWaiting()) credit.Earn(dt);
    }
    if (trainers.empty()) credit.DropSaved();
    // While serving, training spends all the credit the step earned (a share above a half earns
    // more than one micro-batch per step); idle, one micro-batch a turn, so that a request that
    // arrives waits for one at most.
    while (!trainers.empty() && (!serving || credit.CanTrain())) {
      const Clock::time_point t0 = Clock::now();
      Clock::time_point idle_until;
      if (!RunTrainingMicroBatch(&idle_until)) {
        std::lock_guard<std::mutex> lock(mu);
        trainers_idle = true;
        trainers_idle_until = idle_until;
        break;
      }
      const double dt = Seconds(Clock::now() - t0);
      train_seconds.store(train_seconds.load() + dt);
      if (!serving) break;
      credit.Spend(dt);
    }
  }
  // Stopping: every request still queued or running ends as cancelled (its last event sent), later
  // ones are refused; the training jobs stop as StopTraining stops them.
  inference->Shutdown("the engine stopped");
  StopTrainers();
}

void Engine::Impl::StopTrainers() {
  // Each job saves a checkpoint it can resume from and ends as cancelled. A checkpoint is an
  // optimizer-step boundary, so the step in progress is finished first (at most grad_accum - 1
  // micro-batches); a job its user cancelled ends at once.
  for (ActiveTrainer& active : trainers) {
    Trainer& trainer = *active.trainer;
    trainer.Interrupt();  // an evaluation under way is skipped, as StopTraining asks
    // (A job waiting for storage does no work until its wait is over: stepped, it would spin.)
    while (!trainer.done() && !trainer.cancelled() && !trainer.at_step_boundary() &&
           !trainer.idle_until().has_value() && trainer.Step().ok()) {
    }
    if (!trainer.done() && !trainer.cancelled() && trainer.at_step_boundary()) {
      (void)trainer.SaveCheckpoint();
    }
    trainer.Cancel();
    while (!trainer.done() && trainer.Step().ok()) {
    }
  }
  std::lock_guard<std::mutex> lock(mu);
  trainers.clear();
}

void Engine::Impl::TakePendingJobs() {
  while (true) {
    std::optional<PendingJob> job;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (pending_jobs.empty()) return;
      job = std::move(pending_jobs.front());
      pending_jobs.pop_front();
    }
    if (!StartJob(*std::move(job))) ReturnFreedHeap();  // it freed its prepared data
  }
}

void Engine::Impl::EndUnstartedJob(const PendingJob& job) {
  TrainingEvent ended;
  ended.kind = TrainingEvent::Kind::kFinished;
  ended.summary.cancelled = true;
  {
    std::lock_guard<std::mutex> lock(mu);
    EndJob(job.id);
    cancel_job_ids.erase(job.id);
  }
  job.on_event(ended);
}

void Engine::Impl::JoinPreparations() {
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [id, p] : preparations) {
      p.abandon->store(true);
      threads.push_back(std::move(p.thread));
    }
    preparations.clear();
  }
  for (std::thread& t : threads) t.join();
}

bool Engine::Impl::StartJob(PendingJob job) {
  auto on_event = job.on_event;
  const std::string id = job.id;
  std::thread preparer;
  bool unstarted = false;  // cancelled, or training stopped, while its data was prepared
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = preparations.find(id); it != preparations.end()) {
      preparer = std::move(it->second.thread);
      preparations.erase(it);
    }
    unstarted = stop_training || cancel_job_ids.count(id) > 0;
  }
  if (preparer.joinable()) preparer.join();  // it queued the job as its last act
  if (unstarted || absl::IsCancelled(job.prepared.status())) {
    EndUnstartedJob(job);
    return false;
  }
  auto fail = [&](const std::string& error) {
    TrainingEvent failed;
    failed.kind = TrainingEvent::Kind::kFailed;
    failed.error = error;
    {
      // Ended before the event goes out: whoever hears it may start the next job at once.
      std::lock_guard<std::mutex> lock(mu);
      EndJob(id);
      cancel_job_ids.erase(id);
    }
    on_event(failed);
  };
  if (!job.prepared.ok()) {
    fail(std::string(job.prepared.status().message()));
    return false;
  }
  // The memory planner: refuse a job that cannot fit, saying how much it needs. What running
  // jobs hold is already missing from the free memory it measures.
  const bool cpu = device.device == "cpu";
  const int64_t available = cpu ? AvailableHostBytes() : AvailableDeviceBytes(device);
  if (available >= 0) {
    const TrainingMemoryEstimate need = Need(job.config);
    if (need.total() > available) {
      fail("the job needs " + DescribeTrainingNeed(need) + " of " + (cpu ? "host" : "device") +
           " memory but " + ReadableBytes(available) + " is " + (cpu ? "available" : "free") +
           " beside the base model, the KV cache and the jobs already training; " +
           TrainingShrinkHint(job.config));
      return false;
    }
  }
  auto created = Trainer::Create(*model, *tokenizer, options.model_folder, *std::move(job.prepared),
                                 [this, on_event, id](const TrainingEvent& event) {
                                   // The job's slot and memory are free before its last event
                                   // goes out, so the next job can start on hearing it.
                                   if (event.kind == TrainingEvent::Kind::kFinished ||
                                       event.kind == TrainingEvent::Kind::kFailed) {
                                     std::lock_guard<std::mutex> lock(mu);
                                     EndJob(id);
                                   }
                                   on_event(event);
                                 });
  if (!created.ok()) {
    fail(std::string(created.status().message()));
    return false;
  }
  std::lock_guard<std::mutex> lock(mu);
  if (cancel_job_ids.erase(id) > 0) (*created)->Cancel();
  trainers.push_back({id, *std::move(created), job.config.offload_activations});
  return true;
}

bool Engine::Impl::RunTrainingMicroBatch(Clock::time_point* idle_until) {
  // The jobs take turns, one micro-batch each; a job waiting for storage is passed over.
  const Clock::time_point now = Clock::now();
  Clock::time_point earliest = Clock::time_point::max();
  size_t tried = 0;
  for (; tried < trainers.size(); ++tried, ++next_trainer) {
    if (next_trainer >= trainers.size()) next_trainer = 0;
    const auto until = trainers[next_trainer].trainer->idle_until();
    if (!until || *until <= now) break;
    earliest = std::min(earliest, *until);
  }
  if (tried == trainers.size()) {
    if (idle_until != nullptr) *idle_until = earliest;
    return false;
  }
  if (next_trainer >= trainers.size()) next_trainer = 0;
  Trainer& trainer = *trainers[next_trainer].trainer;
  // Step reports its own failure as a kFailed event; either way the job may now be done.
  (void)trainer.Step();
  if (!trainer.done()) {
    ++next_trainer;
    return true;
  }
  std::unique_ptr<Trainer> finished;
  bool offloaded = false;
  {
    std::lock_guard<std::mutex> lock(mu);  // CancelTraining reads the trainers under the lock
    finished = std::move(trainers[next_trainer].trainer);
    offloaded = trainers[next_trainer].offloads;
    trainers.erase(trainers.begin() + static_cast<std::ptrdiff_t>(next_trainer));
  }
  finished.reset();
  ReturnFreedHeap();
  if (offloaded && device.device != "cpu") ReleaseCachedPinnedMemory();
  return true;
}

absl::StatusOr<RequestId> Engine::Generate(GenerationRequest request, TokenCallback on_token) {
  auto id = impl_->inference->Submit(std::move(request), std::move(on_token));
  if (id.ok()) {
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      impl_->pending_work = true;
    }
    impl_->wake.notify_one();
  }
  return id;
}

void Engine::Cancel(RequestId id) {
  impl_->inference->Cancel(id);
  impl_->wake.notify_one();
}

std::string Engine::chat_template_note() const {
  return impl_->chat_template ? impl_->chat_template->unrendered() : "";
}

absl::StatusOr<Engine::RenderedChat> Engine::RenderChat(const std::vector<ChatMessage>& messages,
                                                        const std::string& name,
                                                        bool continue_final_message) const {
  std::optional<ChatTemplate> named;
  if (!name.empty()) {
    // The folder's tokens also where it has no template of its own (a template's usual "<s>"
    // written as text is not the BOS of a model whose BOS is another token).
    auto t = ChatTemplate::FromName(name, impl_->bos_token, impl_->eos_token);
    if (!t.ok()) {  // the request's field
      return absl::Status(t.status().code(), absl::StrCat("template: ", t.status().message()));
    }
    named = std::move(*t);
  } else if (!impl_->chat_template) {
    return absl::FailedPreconditionError(
        "the model has no chat template lorad recognises (" + impl_->chat_template_error +
        "); name one in the request's template field or in model.chat_template");
  }
  const ChatTemplate& chat = named ? *named : *impl_->chat_template;
  auto prompt = continue_final_message ? chat.RenderContinuing(messages)
                                       : chat.Render(messages, /*add_generation_prompt=*/true);
  if (!prompt.ok()) return prompt.status();
  // A conversation the template renders to nothing, or to its BOS alone (llama2's and
  // mistral's without a user message): nothing to answer.
  if (prompt->empty() || *prompt == chat.bos_token()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "messages: the ", chat.name(),
        " chat template renders nothing from them (a system message alone); give a user "
        "message"));
  }
  return RenderedChat{chat.Encode(*impl_->tokenizer, *std::move(prompt)), chat.end_of_turn()};
}

AdapterStore& Engine::adapters() { return *impl_->adapters; }

absl::Status Engine::StartTraining(const std::string& job_id, const TrainingJobConfig& config,
                                   TrainingEventCallback on_event) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stop_training || impl_->stop) {
      return absl::UnavailableError("training is stopped: lorad is shutting down");
    }
    auto& active = impl_->active_job_ids;
    if (std::find(active.begin(), active.end(), job_id) != active.end()) {
      return absl::FailedPreconditionError("training job " + job_id + " is already running");
    }
    if (static_cast<int32_t>(active.size()) >= impl_->options.max_training_jobs) {
      return absl::FailedPreconditionError(
          "training jobs " + absl::StrJoin(active, ", ") + " are running; " +
          std::to_string(impl_->options.max_training_jobs) + " train at a time");
    }
    const TrainingMemoryEstimate need = impl_->Need(config);
    std::string waits_for;
    absl::StatusOr<bool> fits = impl_->FitsNow(need, config, &waits_for);
    if (!fits.ok()) return fits.status();
    if (!*fits) {
      return absl::ResourceExhaustedError("the job needs " + waits_for +
                                          "; start it when one of them (" +
                                          absl::StrJoin(active, ", ") + ") ends");
    }
    active.push_back(job_id);
    impl_->job_bytes[job_id] = need.total();
    if (impl_->device.device != "cpu") impl_->job_host_bytes[job_id] = need.host_bytes;
    TrainingJobConfig job = config;
    // Training formats conversations with the template serving renders chats with.
    job.data.model_chat_template = impl_->options.chat_template;
    auto abandon = std::make_shared<std::atomic<bool>>(false);
    Impl* impl = impl_.get();
    std::thread preparer;
    try {
      preparer =
          std::thread([impl, job_id, job, on_event = std::move(on_event), abandon]() mutable {
            absl::StatusOr<std::shared_ptr<Trainer::PreparedData>> prepared;
            try {  // an exception here would end the process (e.g. bad_alloc on a huge file)
              prepared = Trainer::PrepareData(*impl->model, *impl->tokenizer,
                                              impl->options.model_folder, job, abandon.get());
            } catch (const std::exception& e) {
              prepared =
                  absl::InternalError(absl::StrCat("reading the job's dataset failed: ", e.what()));
            }
            {
              std::lock_guard<std::mutex> lock(impl->mu);
              impl->pending_jobs.push_back(Impl::PendingJob{
                  job_id, std::move(job), std::move(on_event), std::move(prepared)});
              impl->pending_work = true;
            }
            impl->wake.notify_one();
          });
    } catch (const std::system_error& e) {
      impl_->EndJob(job_id);
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot start a thread to read the job's data: ", e.what()));
    }
    impl_->preparations[job_id] = Impl::Preparation{std::move(preparer), abandon};
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Engine::TrainingFitsNow(const TrainingJobConfig& config,
                                             std::string* waits_for) const {
  const TrainingMemoryEstimate need = impl_->Need(config);
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->FitsNow(need, config, waits_for);
}

absl::StatusOr<bool> Engine::TrainingLeavesRoomFor(const TrainingJobConfig& waiting,
                                                   const TrainingJobConfig& candidate,
                                                   int max_jobs) const {
  const TrainingMemoryEstimate need = impl_->Need(waiting);
  const TrainingMemoryEstimate other = impl_->Need(candidate);
  const bool pinned = impl_->device.device != "cpu";  // as StartTraining counts host bytes
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<TrainingHold> running;
  for (const std::string& id : impl_->active_job_ids) {
    const auto bytes = impl_->job_bytes.find(id);
    const auto host = impl_->job_host_bytes.find(id);
    running.push_back({bytes == impl_->job_bytes.end() ? 0 : bytes->second,
                       host == impl_->job_host_bytes.end() ? 0 : host->second});
  }
  return LeavesRoomFor(running, {other.total(), pinned ? other.host_bytes : 0}, max_jobs,
                       [&](const TrainingHold& beside) {
                         return impl_->FitsBeside(need, waiting, beside.bytes,
                                                  beside.pinned_host_bytes, nullptr);
                       });
}

absl::Status Engine::CheckTrainingData(const TrainingJobConfig& config, int64_t max_records,
                                       const std::atomic<bool>* abandon) const {
  TrainingJobConfig checked = config;
  checked.data.model_chat_template = impl_->options.chat_template;  // as StartTraining gives it
  return Trainer::CheckData(*impl_->model, *impl_->tokenizer, impl_->options.model_folder, checked,
                            max_records, abandon);
}

int Engine::StopTraining() {
  std::unique_lock<std::mutex> lock(impl_->mu);
  if (!impl_->loop.joinable()) return 0;
  const int active = static_cast<int>(impl_->active_job_ids.size());
  impl_->stop_training = true;
  // A long evaluation under way would hold the loop (and the checkpoint) for minutes.
  for (const auto& t : impl_->trainers) {
    if (t.trainer) t.trainer->Interrupt();
  }
  for (auto& [id, p] : impl_->preparations) p.abandon->store(true);  // and so would a large read
  impl_->wake.notify_all();
  impl_->training_stopped_cv.wait(lock, [&] { return impl_->training_stopped || impl_->stop; });
  return active;
}

void Engine::CancelTraining(const std::string& job_id) {
  // The trainer pointer belongs to the loop thread; Trainer::Cancel is thread-safe, but the
  // pointer may be reset under us, so the request goes through the lock and the loop.
  std::lock_guard<std::mutex> lock(impl_->mu);
  const auto& active = impl_->active_job_ids;
  if (std::find(active.begin(), active.end(), job_id) == active.end()) return;
  // A job still preparing is not started, even if an earlier job of the same id is still
  // leaving `trainers`.
  const auto preparing = impl_->preparations.find(job_id);
  bool started = false;
  for (const auto& t : impl_->trainers) {
    if (preparing == impl_->preparations.end() && t.id == job_id && t.trainer) {
      t.trainer->Cancel();
      started = true;
    }
  }
  // Not handed to a trainer yet (its data being prepared, or pending): cancel when it is.
  if (!started) {
    impl_->cancel_job_ids.insert(job_id);
    if (preparing != impl_->preparations.end()) preparing->second.abandon->store(true);
  }
  impl_->pending_work = true;
  impl_->wake.notify_one();
}

bool Engine::TrainingActive() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return !impl_->active_job_ids.empty();
}

const ModelConfig& Engine::model_config() const { return impl_->model->config(); }
const DeviceInfo& Engine::device() const { return impl_->device; }
const Tokenizer& Engine::tokenizer() const { return *impl_->tokenizer; }
const std::string& Engine::base_fingerprint() const { return impl_->base_fingerprint; }

EngineStats Engine::Stats() const {
  EngineStats stats;
  stats.inference = impl_->inference->Stats();
  stats.adapters_resident = impl_->adapters->resident_count();
  stats.adapter_device_bytes = impl_->adapters->resident_bytes();
  stats.adapter_stack_bytes = stats.inference.lora_stack_bytes;
  stats.base_bytes = impl_->model->bytes();
  stats.kv_cache_bytes = impl_->options.inference.kv_cache_bytes;
  stats.train_seconds = impl_->train_seconds.load();
  stats.inference_seconds = impl_->inference_seconds.load();
  std::lock_guard<std::mutex> lock(impl_->mu);
  stats.training = !impl_->active_job_ids.empty();
  stats.training_job_ids = impl_->active_job_ids;
  stats.training_jobs_preparing = static_cast<int32_t>(impl_->preparations.size());
  return stats;
}

}  // namespace lorad::engine
