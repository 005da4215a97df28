// A C++17 service on the t2i-rt C API: load a graph set once, serve requests from 4 worker threads
// (one t2i_ctx each, one shared t2i_model), cancel one request mid-run, report latency, and write
// every image as OUT_DIR/seed-SEED.png for examples/cpp/run.sh to compare with `t2i-rt run`.
//
//   service GRAPH_SET ADAPTER_IMAGE OUT_DIR [REQUESTS_PER_THREAD [share]]
//
// With "share", the model's contexts share one ONNX Runtime session per graph (one copy of the
// weights, t2i_model_params.share_weights); the peak resident memory is printed either way.
//
// Requests: prompt "a red house", adapter "sketch" from ADAPTER_IMAGE, 4 steps, seed
// 100 + thread * REQUESTS_PER_THREAD + k. The last request of thread 0 is img2img from an init
// image held in memory (a gradient, also written as OUT_DIR/init.png so the CLI can be given the
// same pixels). Thread 1 first runs seed 99 and cancels it after step 2. Exit status 0 only if
// every call did what it should.

#include <t2i_rt.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kThreads = 4;
constexpr uint32_t kSize = 64;

std::mutex print_mutex;
std::atomic<int> failures{0};

// Prints a failed call with the library's message for this thread.
bool ok(t2i_status status, const char *what) {
    if (status == T2I_OK) return true;
    std::lock_guard<std::mutex> lock(print_mutex);
    std::fprintf(stderr, "%s failed (status %d): %s\n", what, static_cast<int>(status), t2i_last_error());
    failures++;
    return false;
}

void log_to_stderr(void *user_data, uint32_t level, const char *message) {
    std::lock_guard<std::mutex> lock(print_mutex);
    std::fprintf(stderr, "[%s] %s: %s\n", static_cast<const char *>(user_data),
                 level == T2I_LOG_WARNING ? "warning" : "note", message);
}

struct Cancel {
    uint32_t at_step = 0;  // 0: never
    uint32_t last_step = 0;
};

bool progress(void *user_data, uint32_t step, uint32_t /*total*/) {
    auto *cancel = static_cast<Cancel *>(user_data);
    cancel->last_step = step;
    return cancel->at_step == 0 || step < cancel->at_step;
}

// A 64x64 RGB gradient, the img2img request's init image.
std::vector<uint8_t> gradient() {
    std::vector<uint8_t> pixels(kSize * kSize * 3);
    for (uint32_t y = 0; y < kSize; ++y)
        for (uint32_t x = 0; x < kSize; ++x) {
            uint8_t *p = &pixels[(y * kSize + x) * 3];
            p[0] = static_cast<uint8_t>(x * 4);
            p[1] = static_cast<uint8_t>(y * 4);
            p[2] = static_cast<uint8_t>(255 - x * 2);
        }
    return pixels;
}

struct Worker {
    const t2i_model *model;
    std::string adapter_image;
    std::string out_dir;
    int thread;
    int requests;
    std::vector<double> latencies_ms;

    void run() {
        t2i_ctx *ctx = nullptr;
        if (!ok(t2i_ctx_new(model, &ctx), "t2i_ctx_new")) return;
        Cancel cancel;
        ok(t2i_ctx_set_progress(ctx, progress, &cancel), "t2i_ctx_set_progress");

        t2i_adapter_input adapter{};
        adapter.name = "sketch";
        adapter.image.path = adapter_image.c_str();
        adapter.weight = 1.0f;
        t2i_request_params params;
        t2i_request_params_init(&params);
        params.prompt = "a red house";
        params.negative_prompt = "blurry";
        params.adapters = &adapter;
        params.n_adapters = 1;
        params.steps = 4;
        params.width = kSize;
        params.height = kSize;

        if (thread == 1) {
            // Cancelled after step 2: the call returns T2I_ERR_CANCELLED and no result.
            cancel.at_step = 2;
            params.seed = 99;
            t2i_result *result = nullptr;
            t2i_status status = t2i_generate(ctx, &params, &result);
            if (status != T2I_ERR_CANCELLED || result != nullptr || cancel.last_step != 2) {
                std::lock_guard<std::mutex> lock(print_mutex);
                std::fprintf(stderr, "cancel: status %d after step %u, expected T2I_ERR_CANCELLED after 2\n",
                             static_cast<int>(status), cancel.last_step);
                failures++;
            }
            cancel.at_step = 0;
        }

        const std::vector<uint8_t> init_pixels = gradient();
        t2i_image_input init{};
        init.pixels = init_pixels.data();
        init.width = kSize;
        init.height = kSize;
        init.channels = 3;

        for (int k = 0; k < requests; ++k) {
            params.seed = 100 + static_cast<uint64_t>(thread * requests + k);
            const bool img2img = thread == 0 && k == requests - 1;
            params.init_image = img2img ? &init : nullptr;
            params.strength = img2img ? 0.75f : -1.0f;
            auto start = std::chrono::steady_clock::now();
            t2i_result *result = nullptr;
            if (!ok(t2i_generate(ctx, &params, &result), "t2i_generate")) continue;
            latencies_ms.push_back(
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
            t2i_image_view image;
            if (t2i_result_image_count(result) == 1 && ok(t2i_result_image(result, 0, &image), "t2i_result_image")) {
                std::string path = out_dir + "/seed-" + std::to_string(params.seed) + ".png";
                ok(t2i_write_png(&image, path.c_str()), "t2i_write_png");
            } else {
                failures++;
            }
            t2i_result_free(result);
        }
        t2i_ctx_free(ctx);
    }
};

// Peak resident memory of this process in MiB (Linux: VmHWM), or -1.
double peak_rss_mib() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
    return -1;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s GRAPH_SET ADAPTER_IMAGE OUT_DIR [REQUESTS_PER_THREAD]\n", argv[0]);
        return 2;
    }
    const int requests = argc > 4 ? std::atoi(argv[4]) : 2;
    const bool share = argc > 5 && std::strcmp(argv[5], "share") == 0;
    std::printf("t2i-rt %s\n", t2i_version());

    // Errors are statuses with a message, never a crash: a missing set, then a NULL prompt.
    t2i_model *missing = nullptr;
    if (t2i_model_load("/nonexistent/set", nullptr, &missing) != T2I_ERR_GRAPH_SET || missing != nullptr) {
        std::fprintf(stderr, "a missing graph set was not T2I_ERR_GRAPH_SET\n");
        failures++;
    }
    std::printf("missing set refused: %s\n", t2i_last_error());

    t2i_model_params model_params;
    t2i_model_params_init(&model_params);
    model_params.threads = 1;
    model_params.share_weights = share;
    model_params.log = log_to_stderr;
    model_params.log_user_data = const_cast<char *>("model");
    auto load_start = std::chrono::steady_clock::now();
    t2i_model *model = nullptr;
    if (!ok(t2i_model_load(argv[1], &model_params, &model), "t2i_model_load")) return 1;
    std::printf("loaded %s in %.0f ms\n", argv[1],
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - load_start).count());

    // A request the library refuses: T2I_ERR_INVALID_REQUEST with the field and the fix.
    {
        t2i_ctx *ctx = nullptr;
        if (ok(t2i_ctx_new(model, &ctx), "t2i_ctx_new")) {
            t2i_request_params params;
            t2i_request_params_init(&params);
            params.prompt = "x";
            params.width = 100;
            t2i_result *result = nullptr;
            if (t2i_generate(ctx, &params, &result) != T2I_ERR_INVALID_REQUEST || result != nullptr) failures++;
            std::printf("bad size refused: %s\n", t2i_last_error());
            params.prompt = nullptr;
            if (t2i_generate(ctx, &params, &result) != T2I_ERR_INVALID_ARGUMENT) failures++;
            t2i_ctx_free(ctx);
        }
    }

    // The init image the img2img request holds in memory, as a file for the CLI's reference run.
    const std::vector<uint8_t> init_pixels = gradient();
    t2i_image_view init_view{kSize, kSize, 3, init_pixels.data()};
    ok(t2i_write_png(&init_view, (std::string(argv[3]) + "/init.png").c_str()), "t2i_write_png");

    std::vector<Worker> workers;
    for (int t = 0; t < kThreads; ++t) workers.push_back(Worker{model, argv[2], argv[3], t, requests, {}});
    auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (auto &w : workers) threads.emplace_back([&w] { w.run(); });
    for (auto &t : threads) t.join();
    double wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    std::vector<double> all;
    for (auto &w : workers) all.insert(all.end(), w.latencies_ms.begin(), w.latencies_ms.end());
    std::sort(all.begin(), all.end());
    if (!all.empty()) {
        std::printf("%zu requests on %d threads in %.0f ms; latency median %.0f ms, max %.0f ms\n", all.size(),
                    kThreads, wall, all[all.size() / 2], all.back());
    }
    std::printf("peak RSS %.0f MiB (%s)\n", peak_rss_mib(),
                share ? "one session per graph shared by the contexts" : "sessions per context");
    t2i_model_free(model);
    if (all.size() != static_cast<size_t>(kThreads * requests)) failures++;
    std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
    return failures == 0 ? 0 : 1;
}
