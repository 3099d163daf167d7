// An EST client as a device's software would write it, with Bouncy Castle's org.bouncycastle.est
// (Debian's libbcpkix-java). test_est.py compiles and runs it against nginx in front of sapid.
//
//   java EstClient OPERATION HOST:PORT TRUST.pem OUT.pem [--label L] [--csr REQ.der]
//                  [--basic USER PASSWORD] [--p12 CLIENT.p12 PASSWORD]
//
// OPERATION is cacerts, simpleenroll or simplereenroll. The certificates the server returned are
// written to OUT.pem; on an EST error it prints "status N: message" and exits 3.

import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyStore;
import java.security.SecureRandom;
import java.security.Security;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.cert.TrustAnchor;
import java.security.cert.X509Certificate;
import java.util.Base64;
import java.util.HashSet;
import java.util.Set;
import javax.net.ssl.KeyManagerFactory;

import org.bouncycastle.cert.X509CertificateHolder;
import org.bouncycastle.est.CACertsResponse;
import org.bouncycastle.est.ESTAuth;
import org.bouncycastle.est.ESTException;
import org.bouncycastle.est.ESTService;
import org.bouncycastle.est.ESTServiceBuilder;
import org.bouncycastle.est.EnrollmentResponse;
import org.bouncycastle.est.jcajce.JcaHttpAuthBuilder;
import org.bouncycastle.est.jcajce.JcaJceUtils;
import org.bouncycastle.est.jcajce.JsseESTServiceBuilder;
import org.bouncycastle.jce.provider.BouncyCastleProvider;
import org.bouncycastle.pkcs.PKCS10CertificationRequest;

public class EstClient {
    public static void main(String[] args) throws Exception {
        Security.addProvider(new BouncyCastleProvider());   // what org.bouncycastle.est names
        String operation = args[0], server = args[1], trust = args[2], out = args[3];
        String label = null, csr = null, user = null, password = null, p12 = null, p12pass = null;
        for (int i = 4; i < args.length; i++) {
            switch (args[i]) {
                case "--label": label = args[++i]; break;
                case "--csr": csr = args[++i]; break;
                case "--basic": user = args[++i]; password = args[++i]; break;
                case "--p12": p12 = args[++i]; p12pass = args[++i]; break;
                default: throw new IllegalArgumentException(args[i]);
            }
        }
        // The server is trusted as the CA certificates say (RFC 7030 4.1.1: explicit TA).
        CertificateFactory factory = CertificateFactory.getInstance("X.509");
        Set<TrustAnchor> anchors = new HashSet<>();
        try (FileInputStream in = new FileInputStream(trust)) {
            for (Certificate c : factory.generateCertificates(in)) {
                anchors.add(new TrustAnchor((X509Certificate) c, null));
            }
        }
        JsseESTServiceBuilder jsse = new JsseESTServiceBuilder(
            server, JcaJceUtils.getCertPathTrustManager(anchors, null));
        if (p12 != null) {
            KeyStore keys = KeyStore.getInstance("PKCS12");
            try (FileInputStream in = new FileInputStream(p12)) {
                keys.load(in, p12pass.toCharArray());
            }
            KeyManagerFactory managers = KeyManagerFactory.getInstance(
                KeyManagerFactory.getDefaultAlgorithm());
            managers.init(keys, p12pass.toCharArray());
            jsse.withKeyManagers(managers.getKeyManagers());
        }
        ESTServiceBuilder builder = label == null ? jsse : jsse.withLabel(label);
        ESTService est = builder.build();
        X509CertificateHolder[] certificates;
        try {
            if (operation.equals("cacerts")) {
                CACertsResponse response = est.getCACerts();
                certificates = ESTService.storeToArray(response.getCertificateStore());
            } else {
                PKCS10CertificationRequest request = new PKCS10CertificationRequest(
                    Files.readAllBytes(Paths.get(csr)));
                ESTAuth auth = user == null ? null : new JcaHttpAuthBuilder(
                    user, password.toCharArray()).setNonceGenerator(new SecureRandom()).build();
                EnrollmentResponse response = est.simpleEnroll(
                    operation.equals("simplereenroll"), request, auth);
                certificates = ESTService.storeToArray(response.getStore());
            }
        } catch (ESTException e) {
            System.out.println("status " + e.getStatusCode() + ": " + e.getMessage());
            System.exit(3);
            return;
        }
        Base64.Encoder base64 = Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII));
        try (OutputStream pem = new FileOutputStream(out)) {
            for (X509CertificateHolder certificate : certificates) {
                pem.write(("-----BEGIN CERTIFICATE-----\n"
                           + base64.encodeToString(certificate.getEncoded())
                           + "\n-----END CERTIFICATE-----\n").getBytes(StandardCharsets.US_ASCII));
            }
        }
        System.out.println(certificates.length + " certificates");
    }
}
