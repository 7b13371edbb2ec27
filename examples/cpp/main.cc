// Greedy generation with an output folder of topθ-export from C++: onnxruntime's C++ API, the Top-θ custom-op
// library registered with RegisterCustomOpsLibrary, the KV cache in the concat form (docs/graph.md).
//
//   toptheta_generate OUT_DIR TOKEN_IDS NEW_TOKENS [--library PATH] [--logits FILE]
//
// TOKEN_IDS: the prompt as comma-separated token ids. Prints the generated tokens and the first logits of the
// prefill's last row; --logits FILE writes the last row's logits of every step (prefill, then each decode step)
// as raw float32, one vocabulary-sized row per step. The library defaults to OUT_DIR/libtoptheta_ops.so.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string out_dir;
  std::vector<int64_t> prompt;
  int new_tokens = 0;
  std::string library;
  std::string logits_file;
};

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "toptheta_generate: " << message << "\n";
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  if (argc < 4) {
    Fail("usage: toptheta_generate OUT_DIR TOKEN_IDS NEW_TOKENS [--library PATH] [--logits FILE]");
  }
  Options o;
  o.out_dir = argv[1];
  std::stringstream ids(argv[2]);
  for (std::string item; std::getline(ids, item, ',');) {
    try {
      o.prompt.push_back(std::stoll(item));
    } catch (const std::exception&) {
      Fail("TOKEN_IDS must be comma-separated integers, got '" + item + "'");
    }
  }
  if (o.prompt.empty()) Fail("TOKEN_IDS is empty: pass at least one token id");
  o.new_tokens = std::atoi(argv[3]);
  if (o.new_tokens < 1) Fail("NEW_TOKENS must be a positive integer");
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--library") {
      o.library = argv[i + 1];
    } else if (flag == "--logits") {
      o.logits_file = argv[i + 1];
    } else {
      Fail("unknown option " + flag + ": use --library PATH or --logits FILE");
    }
  }
  if (o.library.empty()) o.library = o.out_dir + "/libtoptheta_ops.so";
  return o;
}

// One layer's cache input: its name, and the static heads / head size of [batch, heads, past, head_size].
struct CacheInput {
  std::string name;
  int64_t heads;
  int64_t head_size;
};

}  // namespace

int main(int argc, char** argv) {
  const Options opt = Parse(argc, argv);
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "toptheta_generate");
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(1);  // the same numbers as the Python session with 1 thread
  try {
    so.RegisterCustomOpsLibrary(opt.library.c_str());
  } catch (const Ort::Exception& e) {
    Fail("cannot register the custom-op library " + opt.library + " (" + e.what() +
         "): pass --library PATH to a built libtoptheta_ops.so");
  }
  const std::string model = opt.out_dir + "/model.onnx";
  Ort::Session session{nullptr};
  try {
    session = Ort::Session(env, model.c_str(), so);
  } catch (const Ort::Exception& e) {
    Fail("cannot open " + model + " (" + e.what() + "): pass a folder written by topθ-export");
  }

  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> input_names;
  std::vector<CacheInput> cache;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    std::string name = session.GetInputNameAllocated(i, alloc).get();
    if (name == "past_sequence_length") {
      Fail(model + " has the shared-buffer KV cache: export it with --kv-cache concat for this example");
    }
    if (name.rfind("past_key_values.", 0) == 0) {
      Ort::TypeInfo type = session.GetInputTypeInfo(i);  // owns what info points into
      auto info = type.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        Fail(model + " is not float32: export it with --dtype float32 for this example");
      }
      auto shape = info.GetShape();
      if (shape.size() != 4 || shape[1] <= 0 || shape[3] <= 0) Fail(name + " is not [batch, heads, past, head_size]");
      cache.push_back({name, shape[1], shape[3]});
    }
    input_names.push_back(name);
  }
  if (cache.empty()) Fail(model + " has no KV cache (past_key_values.*): export a decoder with the cache");
  std::vector<std::string> output_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    output_names.push_back(session.GetOutputNameAllocated(i, alloc).get());
  }
  // present.{i}.key/.value in the order of past_key_values.{i}.key/.value
  std::vector<size_t> present_index;
  for (const auto& c : cache) {
    const std::string want = "present." + c.name.substr(std::string("past_key_values.").size());
    auto it = std::find(output_names.begin(), output_names.end(), want);
    if (it == output_names.end()) Fail(model + " has no output " + want);
    present_index.push_back(static_cast<size_t>(it - output_names.begin()));
  }
  const size_t logits_index =
      static_cast<size_t>(std::find(output_names.begin(), output_names.end(), "logits") - output_names.begin());
  if (logits_index == output_names.size()) Fail(model + " has no output 'logits'");

  std::vector<const char*> in_names, out_names;
  for (const auto& n : input_names) in_names.push_back(n.c_str());
  for (const auto& n : output_names) out_names.push_back(n.c_str());

  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> past;  // empty caches [1, heads, 0, head_size] for the prefill
  std::vector<float> no_data;
  for (const auto& c : cache) {
    const int64_t shape[4] = {1, c.heads, 0, c.head_size};
    past.push_back(Ort::Value::CreateTensor<float>(cpu, no_data.data(), 0, shape, 4));
  }

  std::ofstream logits_out;
  if (!opt.logits_file.empty()) {
    logits_out.open(opt.logits_file, std::ios::binary);
    if (!logits_out) Fail("cannot write " + opt.logits_file + ": choose a writable path");
  }
  std::vector<int64_t> ids = opt.prompt;
  std::vector<int64_t> generated;
  int64_t total = 0;
  for (int step = 0; step < opt.new_tokens; ++step) {
    total += static_cast<int64_t>(ids.size());
    std::vector<int64_t> mask(static_cast<size_t>(total), 1);
    const int64_t ids_shape[2] = {1, static_cast<int64_t>(ids.size())};
    const int64_t mask_shape[2] = {1, total};
    std::vector<Ort::Value> inputs;
    size_t cache_i = 0;
    for (const auto& name : input_names) {
      if (name == "input_ids") {
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, ids.data(), ids.size(), ids_shape, 2));
      } else if (name == "attention_mask") {
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), mask_shape, 2));
      } else if (name.rfind("past_key_values.", 0) == 0) {
        inputs.push_back(std::move(past[cache_i++]));
      } else {
        Fail(model + " has an input this example does not feed: " + name);
      }
    }
    auto outputs = session.Run(Ort::RunOptions{nullptr}, in_names.data(), inputs.data(), inputs.size(),
                               out_names.data(), out_names.size());
    auto shape = outputs[logits_index].GetTensorTypeAndShapeInfo().GetShape();  // [1, S, vocab]
    const int64_t vocab = shape[2];
    const float* last = outputs[logits_index].GetTensorData<float>() + (shape[1] - 1) * vocab;
    if (logits_out) logits_out.write(reinterpret_cast<const char*>(last), static_cast<std::streamsize>(vocab * 4));
    if (step == 0) {
      std::printf("prefill logits[0:8]:");
      for (int64_t v = 0; v < std::min<int64_t>(8, vocab); ++v) std::printf(" %.6f", last[v]);
      std::printf("\n");
    }
    const int64_t next = static_cast<int64_t>(std::max_element(last, last + vocab) - last);
    generated.push_back(next);
    for (size_t i = 0; i < cache.size(); ++i) past[i] = std::move(outputs[present_index[i]]);
    ids.assign(1, next);
  }
  std::printf("tokens:");
  for (auto t : generated) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\n");
  return 0;
}
