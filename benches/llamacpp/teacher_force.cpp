// Teacher-forced top-5 log-probs from llama.cpp, with the protocol of the oracle in
// marco-model/tests/data/llamacpp (prompt as one batch, then one forced token per step,
// 2 threads, flash attention off, f16 KV cache). Used by oracle_noise.sh.
//
//   teacher_force MODEL.gguf CASES.tsv > out.json
//
// CASES.tsv: one case per line, "name<TAB>prompt ids<TAB>forced ids" (ids comma-separated).
// KV_F32=1 stores the KV cache in f32, FA=1 turns flash attention on: the two variants
// oracle_noise.sh compares with the default.
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <string>
#include <algorithm>
#include <fstream>
#include <sstream>
int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MODEL.gguf CASES.tsv\n", argv[0]); return 2; }
    const char* model_path = argv[1];
    const char* input = argv[2];
    int kv_f32 = getenv("KV_F32") ? 1 : 0;
    int fa = getenv("FA") ? 1 : 0;
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model* model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", model_path); return 1; }
    const llama_vocab* vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    std::ifstream in(input);
    std::string line;
    printf("[\n");
    bool first_case = true;
    while (std::getline(in, line)) {
        std::string name, a, b;
        std::stringstream ss(line);
        std::getline(ss, name, '\t'); std::getline(ss, a, '\t'); std::getline(ss, b, '\t');
        auto parse = [](const std::string& s) { std::vector<llama_token> v; std::stringstream t(s); std::string x; while (std::getline(t, x, ',')) v.push_back(atoi(x.c_str())); return v; };
        auto prompt = parse(a), forced = parse(b);
        auto cp = llama_context_default_params();
        cp.n_ctx = 2048; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = 2; cp.n_threads_batch = 2;
        cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        if (kv_f32) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
        llama_context* ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
        llama_batch batch = llama_batch_get_one(prompt.data(), prompt.size());
        if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
        printf("%s{\"name\":\"%s\",\"steps\":[", first_case ? "" : ",", name.c_str());
        first_case = false;
        for (size_t i = 0; i < forced.size(); i++) {
            float* logits = llama_get_logits_ith(ctx, -1);
            double mx = -1e30; for (int k = 0; k < n_vocab; k++) mx = std::max(mx, (double)logits[k]);
            double s = 0; for (int k = 0; k < n_vocab; k++) s += exp((double)logits[k] - mx);
            double lse = mx + log(s);
            std::vector<int> idx(n_vocab); for (int k = 0; k < n_vocab; k++) idx[k] = k;
            std::partial_sort(idx.begin(), idx.begin() + 5, idx.end(), [&](int x, int y) { return logits[x] > logits[y]; });
            printf("%s{\"ids\":[", i ? "," : "");
            for (int k = 0; k < 5; k++) printf("%s%d", k ? "," : "", idx[k]);
            printf("],\"lp\":[");
            for (int k = 0; k < 5; k++) printf("%s%.7f", k ? "," : "", logits[idx[k]] - lse);
            printf("]}");
            llama_token t = forced[i];
            llama_batch b1 = llama_batch_get_one(&t, 1);
            if (llama_decode(ctx, b1)) { fprintf(stderr, "decode failed\n"); return 1; }
        }
        printf("]}\n");
        llama_free(ctx);
    }
    printf("]\n");
    llama_model_free(model);
    return 0;
}
