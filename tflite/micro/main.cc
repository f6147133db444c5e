// TFLite Micro application template generated next to a keras_microtune
// conversion. It loads the model from model_data.cc, registers exactly the
// model's ops (op_resolver.h), allocates kTensorArenaSize bytes, runs the test
// input from test_data.h and compares the output with the expected one that
// keras_microtune measured in the TFLite Micro interpreter.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "model_data.h"
#include "op_resolver.h"
#include "test_data.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {
alignas(16) uint8_t tensor_arena[kTensorArenaSize];
}  // namespace

int main() {
  tflite::InitializeTarget();
  const tflite::Model* model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    std::printf("model schema %lu != %d\n",
                static_cast<unsigned long>(model->version()),
                TFLITE_SCHEMA_VERSION);
    return 1;
  }
  kmt::OpResolver resolver;
  if (kmt::RegisterOps(resolver) != kTfLiteOk) {
    std::printf("op registration failed\n");
    return 1;
  }
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena,
                                       kTensorArenaSize);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    std::printf("AllocateTensors failed: raise kTensorArenaSize\n");
    return 1;
  }
  TfLiteTensor* input = interpreter.input(0);
  if (input->bytes != kmt::kTestInputLen) {
    std::printf("input is %u bytes, test data %u\n",
                static_cast<unsigned>(input->bytes), kmt::kTestInputLen);
    return 1;
  }
  std::memcpy(input->data.raw, kmt::kTestInput, kmt::kTestInputLen);
  if (interpreter.Invoke() != kTfLiteOk) {
    std::printf("Invoke failed\n");
    return 1;
  }
  const TfLiteTensor* output = interpreter.output(0);
  if (output->bytes != kmt::kExpectedOutputLen ||
      std::memcmp(output->data.raw, kmt::kExpectedOutput,
                  kmt::kExpectedOutputLen) != 0) {
    std::printf("FAIL: output differs from keras_microtune's TFLite Micro run\n");
    return 1;
  }
  std::printf("PASS: %s, arena used %u of %d bytes\n", g_model_name,
              static_cast<unsigned>(interpreter.arena_used_bytes()),
              kTensorArenaSize);
  return 0;
}
