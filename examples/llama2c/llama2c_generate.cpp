// Greedy text generation from BOS with a llama2.c checkpoint.
//
//   llama2c_generate CHECKPOINT TOKENIZER [STEPS]
//
// Prints the decoded text of up to STEPS generated tokens (default 256, at
// most the model's trained context). Like llama2.c's generate, it stops
// early when the model emits BOS, which marks the start of a new text.
#include "examples/llama2c/checkpoint.hpp"
#include "examples/llama2c/model.hpp"
#include "examples/llama2c/tokenizer.hpp"

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <span>

namespace {

int argmax(std::span<const float> logits) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int>(best);
}

int run(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: llama2c_generate CHECKPOINT TOKENIZER [STEPS]\n"
                 "  CHECKPOINT  llama2.c float32 checkpoint (.bin)\n"
                 "  TOKENIZER   llama2.c tokenizer (.bin) of the same vocabulary\n"
                 "  STEPS       tokens to generate, 1 to the model's seq_len (default 256)\n";
    return 2;
  }
  llama2c::Model model(llama2c::load_checkpoint(argv[1]));
  const llama2c::Tokenizer tokenizer = llama2c::Tokenizer::load(argv[2], model.config().vocab_size);

  long steps = std::min(256L, static_cast<long>(model.config().seq_len));
  if (argc == 4) {
    char* end = nullptr;
    steps = std::strtol(argv[3], &end, 10);
    if (end == argv[3] || *end != '\0' || steps < 1 || steps > model.config().seq_len) {
      std::cerr << "llama2c_generate: STEPS '" << argv[3] << "' is invalid; pass an integer from 1 to "
                << model.config().seq_len << " (the model's trained context)\n";
      return 2;
    }
  }

  auto caches = llama2c::make_layer_caches(model.config(), kvevict::PositionMode::original, steps);
  int token = llama2c::Tokenizer::bos_id;
  for (long position = 0; position < steps; ++position) {
    const int next = argmax(model.forward(token, position, std::span(caches)));
    if (next == llama2c::Tokenizer::bos_id) break;
    std::cout << tokenizer.decode(token, next);
    token = next;
  }
  std::cout << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "llama2c_generate: " << error.what() << '\n';
    return 1;
  }
}
